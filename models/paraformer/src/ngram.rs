//! Token-level n-gram language model in ARPA format, scored as ESPnet's `NgramFullScorer` scores
//! a kenlm model (the `ngram_file` / `ngram_weight` options of ESPnet's and FunASR's
//! recognisers, `espnet/nets/scorers/ngram.py`): the words of the ARPA file are the model's token
//! strings (e.g. `c@@ a@@ t`), every hypothesis starts in the `<s>` context, and a token's score
//! is its **log10** probability (kenlm's `BaseScore`) given the tokens before it, backing off
//! through shorter contexts (`P(w | h) = p(h w)` if listed, else `bow(h) · P(w | h')`). A token
//! the file lacks scores as `<unk>`, or −100 when the file has no `<unk>` (kenlm's substitute).
//!
//! Reads plain ARPA text or gzip-compressed ARPA (`.arpa.gz`; detected by its magic bytes).

use std::collections::HashMap;
use std::io::Read;

use crate::{ParaformerError, Result};

/// log10 probability kenlm substitutes for `<unk>` when the ARPA file lists none.
const MISSING_UNK: f32 = -100.0;

/// An n-gram model over a Paraformer token list.
#[derive(Debug)]
pub struct NgramLm {
    order: usize,
    /// `grams[k]`: the (k+1)-grams, word ids -> (log10 p, log10 backoff).
    grams: Vec<HashMap<Vec<u32>, (f32, f32)>>,
    /// Model token id -> ARPA word id (`<unk>`'s for a token the LM lacks).
    token_word: Vec<u32>,
    bos: u32,
    unk: u32,
}

fn bad(msg: impl Into<String>) -> ParaformerError {
    ParaformerError::Config(format!("ngram: {}", msg.into()))
}

impl NgramLm {
    /// Parse ARPA bytes (plain or gzip) and map its words onto `tokens` (the model's token list).
    pub fn from_bytes(bytes: &[u8], tokens: &[String]) -> Result<Self> {
        if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut text = String::new();
            flate2::read::GzDecoder::new(bytes)
                .read_to_string(&mut text)
                .map_err(|e| bad(format!("gzip: {e}")))?;
            Self::from_arpa(&text, tokens)
        } else {
            let text = std::str::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
            Self::from_arpa(text, tokens)
        }
    }

    /// Parse ARPA text and map its words onto `tokens`.
    pub fn from_arpa(text: &str, tokens: &[String]) -> Result<Self> {
        let mut words: HashMap<String, u32> = HashMap::new();
        let mut grams: Vec<HashMap<Vec<u32>, (f32, f32)>> = Vec::new();
        let mut declared: Vec<usize> = Vec::new();
        let mut section = 0usize; // 0: header, n: in the n-grams
        let mut in_data = false;
        for (lineno, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if line == "\\data\\" {
                in_data = true;
                continue;
            }
            if line == "\\end\\" {
                break;
            }
            if let Some(n) = line
                .strip_prefix('\\')
                .and_then(|s| s.strip_suffix("-grams:"))
            {
                section = n
                    .parse()
                    .map_err(|_| bad(format!("line {}: bad section '{line}'", lineno + 1)))?;
                if section == 0 || section > declared.len() {
                    return Err(bad(format!(
                        "line {}: section {section} not declared in \\data\\",
                        lineno + 1
                    )));
                }
                continue;
            }
            if section == 0 {
                if in_data && let Some(decl) = line.strip_prefix("ngram ") {
                    let (n, c) = decl
                        .split_once('=')
                        .ok_or_else(|| bad(format!("line {}: '{line}'", lineno + 1)))?;
                    let n: usize = n.trim().parse().map_err(|_| bad(format!("'{line}'")))?;
                    let c: usize = c.trim().parse().map_err(|_| bad(format!("'{line}'")))?;
                    if n != declared.len() + 1 {
                        return Err(bad(format!("'{line}': orders must be listed 1, 2, …")));
                    }
                    declared.push(c);
                    grams.push(HashMap::with_capacity(c));
                }
                continue;
            }
            let mut f = line.split_whitespace();
            let logp: f32 = f
                .next()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("line {}: no probability", lineno + 1)))?;
            let mut key = Vec::with_capacity(section);
            for _ in 0..section {
                let w = f.next().ok_or_else(|| {
                    bad(format!("line {}: fewer than {section} words", lineno + 1))
                })?;
                let next = words.len() as u32;
                key.push(*words.entry(w.to_string()).or_insert(next));
            }
            let bow = match f.next() {
                Some(s) => s
                    .parse()
                    .map_err(|_| bad(format!("line {}: bad backoff '{s}'", lineno + 1)))?,
                None => 0.0,
            };
            grams[section - 1].insert(key, (logp, bow));
        }
        if grams.is_empty() || grams[0].is_empty() {
            return Err(bad("no \\data\\ section or no unigrams"));
        }
        for (k, (g, &d)) in grams.iter().zip(&declared).enumerate() {
            if g.len() != d {
                return Err(bad(format!(
                    "{} {}-grams listed, {d} declared",
                    g.len(),
                    k + 1
                )));
            }
        }
        let bos = *words
            .get("<s>")
            .ok_or_else(|| bad("the model has no <s> unigram"))?;
        // kenlm maps every word it lacks to <unk> (added at -100 when the file has none) and
        // scores it like any word, backing off through the contexts
        let next = words.len() as u32;
        let unk = *words.entry("<unk>".to_string()).or_insert(next);
        grams[0].entry(vec![unk]).or_insert((MISSING_UNK, 0.0));
        let token_word = tokens
            .iter()
            .map(|t| words.get(t).copied().unwrap_or(unk))
            .collect();
        Ok(NgramLm {
            order: grams.len(),
            grams,
            token_word,
            bos,
            unk,
        })
    }

    /// The model's order (longest n-gram).
    pub fn order(&self) -> usize {
        self.order
    }

    /// The LM context of a token sequence (without `<s>`): its last `order - 1` words after `<s>`.
    pub fn context(&self, token_ids: &[u32]) -> Vec<u32> {
        let keep = self.order.saturating_sub(1);
        let tail = &token_ids[token_ids.len().saturating_sub(keep)..];
        let bos = (tail.len() < keep).then_some(self.bos); // <s> is in reach
        bos.into_iter()
            .chain(tail.iter().map(|&t| self.word(t)))
            .collect()
    }

    /// Word id of a model token (`<unk>`'s for a token outside the list).
    fn word(&self, token: u32) -> u32 {
        self.token_word
            .get(token as usize)
            .copied()
            .unwrap_or(self.unk)
    }

    /// log10 P(word | ctx) with backoff; `ctx` already cut to `order - 1` words.
    fn logp_word(&self, ctx: &[u32], w: u32) -> f32 {
        let mut key: Vec<u32> = Vec::with_capacity(ctx.len() + 1);
        let mut bow = 0.0f32;
        let mut start = 0;
        loop {
            let h = &ctx[start..];
            key.clear();
            key.extend_from_slice(h);
            key.push(w);
            if let Some(&(p, _)) = self.grams.get(key.len() - 1).and_then(|g| g.get(&key)) {
                return bow + p;
            }
            if h.is_empty() {
                return bow + MISSING_UNK; // unreachable: every word id has a unigram
            }
            if let Some(&(_, b)) = self.grams[h.len() - 1].get(h) {
                bow += b;
            }
            start += 1;
        }
    }

    /// log10 P(token | context) for every token of the model's list (`ctx` from
    /// [`context`](Self::context)).
    pub fn scores(&self, ctx: &[u32]) -> Vec<f32> {
        (0..self.token_word.len() as u32)
            .map(|t| self.logp_word(ctx, self.word(t)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARPA: &str = "\n\\data\\\nngram 1=5\nngram 2=3\n\n\\1-grams:\n-99\t<s>\t-0.30\n\
        -0.50\ta\t-0.20\n-0.70\tb\n-0.60\t</s>\n-2.00\t<unk>\n\n\\2-grams:\n-0.10\t<s> a\n\
        -0.40\ta b\n-0.90\ta </s>\n\n\\end\\\n";

    fn toks() -> Vec<String> {
        ["<blank>", "<s>", "</s>", "a", "b", "c"]
            .map(String::from)
            .to_vec()
    }

    #[test]
    fn backoff_and_unknown_tokens() {
        let lm = NgramLm::from_arpa(ARPA, &toks()).unwrap();
        assert_eq!(lm.order(), 2);
        let s = lm.scores(&lm.context(&[]));
        // <s> a listed; <s> b backs off: bow(<s>) + p(b)
        assert!((s[3] - -0.10).abs() < 1e-6);
        assert!((s[4] - (-0.30 + -0.70)).abs() < 1e-6);
        // "c" and "<blank>" are not in the LM: <unk>, after the backoff of <s>
        assert!((s[5] - -2.30).abs() < 1e-6 && (s[0] - -2.30).abs() < 1e-6);
        let s = lm.scores(&lm.context(&[3]));
        assert!((s[4] - -0.40).abs() < 1e-6);
        assert!((s[2] - -0.90).abs() < 1e-6);
        // b after b: no bigram, no bow on b -> p(b)
        let s = lm.scores(&lm.context(&[3, 4]));
        assert!((s[4] - -0.70).abs() < 1e-6);
    }

    #[test]
    fn gzip_and_malformed_files() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(ARPA.as_bytes()).unwrap();
        let lm = NgramLm::from_bytes(&gz.finish().unwrap(), &toks()).unwrap();
        assert_eq!(lm.order(), 2);
        let missing = ARPA.replace("ngram 2=3", "ngram 2=4");
        assert!(
            NgramLm::from_arpa(&missing, &toks())
                .unwrap_err()
                .to_string()
                .contains("3 2-grams listed, 4 declared")
        );
        assert!(NgramLm::from_arpa("hello", &toks()).is_err());
        assert!(NgramLm::from_bytes(&[0x1f, 0x8b, 0, 1], &toks()).is_err());
    }
}
