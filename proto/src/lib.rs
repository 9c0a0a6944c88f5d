//! Cadenza's public gRPC API, package `cadenza.v1`.
//!
//! One `.proto` file per service under `proto/cadenza/v1/` plus `common.proto`. The generated
//! client and server code lives in [`v1`]; [`FILE_DESCRIPTOR_SET`] feeds server reflection.

/// Generated messages, clients and servers of `cadenza.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("cadenza.v1");
}

/// Encoded `FileDescriptorSet` of every `cadenza.v1` file, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("cadenza_descriptor");
