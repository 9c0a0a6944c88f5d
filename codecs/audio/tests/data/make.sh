#!/bin/sh
# Regenerates the committed test fixtures in this directory. CI does not run this; the tests
# only read the committed outputs. Needs Debian's:
#   apt-get install -y sox libsox-fmt-all flac vorbis-tools
#
# Every file is a stereo tone, 440 Hz on the left and 880 Hz on the right, at half amplitude,
# so the tests can check that both channels survive decoding.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# 1.0 s at 22050 Hz, 16-bit, for FLAC.
sox -n -r 22050 -c 2 -b 16 "$tmp/tone22k.wav" synth 1.0 sine 440 sine 880 vol 0.5
# 3.0 s at 22050 Hz for Vorbis: long enough for the audio to span two OGG pages, so a cut
# file still has a whole page to decode.
sox -n -r 22050 -c 2 -b 16 "$tmp/tone22k-3s.wav" synth 3.0 sine 440 sine 880 vol 0.5
# 0.5 s at 44100 Hz for MP3 (MPEG-1 layer III).
sox -n -r 44100 -c 2 -b 16 "$tmp/tone44k.wav" synth 0.5 sine 440 sine 880 vol 0.5

flac --silent --force --best --no-padding -o tone.flac "$tmp/tone22k.wav"
oggenc --quiet -q 0 -o tone.ogg "$tmp/tone22k-3s.wav"
sox "$tmp/tone44k.wav" -C 64 tone.mp3

ls -l tone.flac tone.ogg tone.mp3
