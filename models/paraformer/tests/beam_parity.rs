//! Parity of the beam search with n-gram shallow fusion against FunASR's `BeamSearchPara` with
//! ESPnet's `LengthBonus` and a kenlm-style ARPA scorer (fixtures written by
//! `tools/fixtures/paraformer_beam.py`): the whole N-best list, tokens and scores, for beams of
//! 1 to 10, LM weights 0 to 2, positive and negative length bonus, hypotheses that end early
//! on `</s>` (end detection), a model token the LM lacks, and joint CTC prefix scoring (weights
//! 0.3 to 1, with and without the pre-beam).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use cadenza_paraformer::search::{DecodeOptions, beam_search};
use cadenza_paraformer::{DecodingConfig, NgramLm};

#[derive(serde::Deserialize)]
struct Hyp {
    tokens: Vec<u32>,
    score: f32,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    beam_size: usize,
    ngram_weight: f32,
    penalty: f32,
    ctc_weight: f32,
    am: Vec<Vec<f32>>,
    ctc: Vec<Vec<f32>>,
    nbest: Vec<Hyp>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    tokens: Vec<String>,
    eos: u32,
    cases: Vec<Case>,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/paraformer/beam")
}

#[test]
fn nbest_lists_match_funasr() -> Result<()> {
    let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json"))?)?;
    let lm = Arc::new(NgramLm::from_bytes(
        &std::fs::read(dir().join("lm.arpa"))?,
        &fx.tokens,
    )?);
    for c in &fx.cases {
        let opts = DecodeOptions {
            beam_size: c.beam_size,
            ngram: Some(lm.clone()),
            ngram_weight: c.ngram_weight,
            penalty: c.penalty,
            ctc_weight: c.ctc_weight,
            vtln_warps: Vec::new(),
        };
        let am: Vec<f32> = c.am.concat();
        let ctc: Vec<f32> = c.ctc.concat();
        let ctc = (!ctc.is_empty()).then_some(ctc.as_slice());
        let got = beam_search(&am, fx.tokens.len(), fx.eos, &opts, ctc);
        assert_eq!(got.len(), c.nbest.len(), "{}: N-best size", c.name);
        for (k, (g, w)) in got.iter().zip(&c.nbest).enumerate() {
            assert_eq!(g.tokens, w.tokens, "{} hyp {k}", c.name);
            assert!(
                (g.score - w.score).abs() < 1e-3,
                "{} hyp {k}: score {} vs {}",
                c.name,
                g.score,
                w.score
            );
        }
    }
    Ok(())
}

#[test]
fn decoding_yaml_is_checked() -> Result<()> {
    let toks: Vec<String> = ["<blank>", "<s>", "</s>", "a"].map(String::from).to_vec();
    let cfg = DecodingConfig::from_yaml("beam_size: 4\nngram_weight: 0.5\n")?;
    let err = cfg.options(None, &toks).unwrap_err().to_string();
    assert!(err.contains("needs an ngram_file"), "{err}");
    let cfg = DecodingConfig::from_yaml("beam_size: 0\n")?;
    assert!(
        cfg.options(None, &toks)
            .unwrap_err()
            .to_string()
            .contains("beam_size 0")
    );
    assert!(
        DecodingConfig::from_yaml("beam: 4\n").is_err(),
        "unknown key"
    );
    let greedy = DecodingConfig::default().options(None, &toks)?;
    assert!(!greedy.uses_beam_search(true));
    let ctc = DecodingConfig::from_yaml("decoding_ctc_weight: 0.3\n")?.options(None, &toks)?;
    assert!(ctc.uses_beam_search(true), "CTC alone runs the beam search");
    assert!(
        !ctc.uses_beam_search(false),
        "not without the model's CTC layer (FunASR)"
    );
    let bad = DecodingConfig::from_yaml("decoding_ctc_weight: 1.5\n")?;
    assert!(bad.options(None, &toks).is_err());
    let over = DecodingConfig::from_yaml("beam_size: 4\nngram_weight: 0.5\n")?
        .overridden_by(&DecodingConfig::from_yaml("ngram_weight: 0.0\n")?);
    assert_eq!(over.ngram_weight, Some(0.0));
    assert_eq!(over.beam_size, Some(4));
    Ok(())
}
