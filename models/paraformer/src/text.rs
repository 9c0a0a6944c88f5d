//! Token post-processing: text joining (FunASR `sentence_postprocess` without timestamps,
//! `funasr/utils/postprocess_utils.py`) and token timestamps (`ts_prediction_lfr6_standard`,
//! `funasr/utils/timestamp_tools.py`), both funasr 1.4.16.

const SPECIAL: [&str; 4] = ["<s>", "</s>", "<unk>", "<OOV>"];

fn clean(s: &str) -> String {
    let mut c = s.replace(' ', "");
    for sp in ["</s>", "<s>", "<unk>", "<OOV>"] {
        c = c.replace(sp, "");
    }
    c
}

/// `isChinese`: a *string* comparison in the reference (`"\u4e00" <= ch <= "\u9fff"` or
/// `"0" <= ch <= "9"` or `ch == "@"`), so multi-character strings compare lexicographically.
fn is_chinese(s: &str) -> bool {
    ("\u{4e00}"..="\u{9fff}").contains(&s) || ("0"..="9").contains(&s) || s == "@"
}

/// Python `str.isalpha` (non-empty, every character alphabetic).
fn is_alpha(s: &str) -> bool {
    !s.is_empty() && s.chars().all(char::is_alphabetic)
}

/// `isAllChinese` over items (each cleaned of spaces and special tokens).
fn all_chinese<'a>(items: impl Iterator<Item = &'a str>) -> bool {
    let mut any = false;
    for i in items {
        any = true;
        if !is_chinese(&clean(i)) {
            return false;
        }
    }
    any
}

/// `isAllAlpha` over items.
fn all_alpha<'a>(items: impl Iterator<Item = &'a str>) -> bool {
    let mut any = false;
    for i in items {
        any = true;
        let c = clean(i);
        if !is_alpha(&c) && c != "'" {
            return false;
        }
        if is_alpha(&c) && is_chinese(&c) {
            return false;
        }
    }
    any
}

fn chars_of(s: &str) -> Vec<String> {
    s.chars().map(String::from).collect()
}

/// A single ASCII letter (`len(w) == 1 and w.encode().isalpha()`).
fn single_ascii_letter(w: &str) -> bool {
    let mut c = w.chars();
    matches!((c.next(), c.next()), (Some(ch), None) if ch.is_ascii_alphabetic())
}

/// `abbr_dispose` without timestamps: runs of single letters separated by `" "` items become
/// one upper-case word ("a b c" -> "ABC").
fn abbr_dispose(words: &[String]) -> Vec<String> {
    let n = words.len();
    let mut begins = Vec::new();
    let mut ends = Vec::new();
    let mut last: isize = -1;
    for start in 0..n {
        if (start as isize) <= last {
            continue;
        }
        if single_ascii_letter(&words[start])
            && start + 2 < n
            && words[start + 1] == " "
            && single_ascii_letter(&words[start + 2])
        {
            begins.push(start);
            let mut num = start + 2;
            ends.push(num);
            loop {
                num += 1;
                if num < n && words[num] == " " {
                    num += 1;
                    if num < n && single_ascii_letter(&words[num]) {
                        ends.pop();
                        ends.push(num);
                        last = num as isize;
                    } else {
                        break;
                    }
                } else {
                    break;
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut last: isize = -1;
    for start in 0..n {
        if (start as isize) <= last {
            continue;
        }
        if begins.contains(&start) {
            let mut word = words[start].to_uppercase();
            let mut num = start + 1;
            while num < n {
                if ends.contains(&num) {
                    word += &words[num].to_uppercase();
                    last = num as isize;
                    break;
                } else if words[num].chars().all(|c| c.is_ascii_alphabetic())
                    && !words[num].is_empty()
                {
                    word += &words[num].to_uppercase();
                }
                num += 1;
            }
            out.push(word);
        } else {
            out.push(words[start].clone());
        }
    }
    out
}

/// Join tokens into text as FunASR's `sentence_postprocess(words)` (no timestamps): Chinese
/// characters are concatenated, English tokens separated by spaces, `@@` marks a BPE piece that
/// continues into the next token, single letters in a row become an upper-case abbreviation.
pub fn sentence_postprocess(tokens: &[String]) -> String {
    let middle: Vec<&str> = tokens
        .iter()
        .map(String::as_str)
        .filter(|w| !SPECIAL.contains(w))
        .collect();
    let mut words: Vec<String> = Vec::new();
    let mut item = String::new();
    if all_chinese(middle.iter().copied()) {
        words = middle.iter().map(|w| w.replace(' ', "")).collect();
    } else if all_alpha(middle.iter().copied()) {
        for w in &middle {
            if w.contains("@@") {
                item += &w.replace("@@", "");
            } else {
                item += w;
                words.push(std::mem::take(&mut item));
                words.push(" ".into());
            }
        }
    } else {
        let mut alpha_blank = false;
        for w in &middle {
            let chars = chars_of(w);
            if all_chinese(chars.iter().map(String::as_str)) {
                if alpha_blank {
                    words.pop();
                }
                words.push(w.to_string());
                alpha_blank = false;
            } else if w.contains("@@") {
                item += &w.replace("@@", "");
                alpha_blank = false;
            } else if all_alpha(chars.iter().map(String::as_str)) {
                item += w;
                words.push(std::mem::take(&mut item));
                words.push(" ".into());
                alpha_blank = true;
            } else {
                words.push(w.to_string());
            }
        }
    }
    abbr_dispose(&words).concat().trim().to_string()
}

/// `cif_wo_hidden`: the loop form of CIF without hidden states (float32 integrator).
fn cif_wo_hidden(alphas: &[f32], threshold: f32) -> Vec<f32> {
    let mut integrate = 0f32;
    let mut fires = Vec::with_capacity(alphas.len());
    for &a in alphas {
        integrate += a;
        fires.push(integrate);
        if integrate >= threshold {
            integrate -= threshold;
        }
    }
    fires
}

/// FunASR `ts_prediction_lfr6_standard(us_alphas, us_peaks, char_list, upsample_rate=1)`:
/// `[start_ms, end_ms]` per token (silence segments dropped). Frames are 60 ms, shifted by -1.5
/// frames; when the peaks do not fire exactly `tokens + 1` times the alphas are rescaled to sum to
/// `tokens + 1` and re-integrated. `Paraformer.inference` (model.py) calls it with the CIF
/// "fires" as `us_alphas` and the CIF weights as `us_peaks`; [`crate::Paraformer`] does the same.
pub fn ts_prediction_lfr6_standard(
    us_alphas: &[f32],
    us_peaks: &[f32],
    tokens: &[String],
) -> Vec<[i64; 2]> {
    const START_END_THRESHOLD: f64 = 5.0;
    const MAX_TOKEN_DURATION: f64 = 12.0;
    const FORCE_TIME_SHIFT: f64 = -1.5;
    let time_rate: f64 = 10.0 * 6.0 / 1000.0 / 1.0;
    let mut tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    if tokens.is_empty() {
        return Vec::new();
    }
    if tokens.last() == Some(&"</s>") {
        tokens.pop();
    }
    let thr = 1.0f32 - 1e-4;
    let places = |peaks: &[f32]| -> Vec<f64> {
        peaks
            .iter()
            .enumerate()
            .filter(|(_, p)| **p >= thr)
            .map(|(i, _)| i as f64 + FORCE_TIME_SHIFT)
            .collect()
    };
    let mut peaks = us_peaks.to_vec();
    let mut fire = places(&peaks);
    if fire.len() != tokens.len() + 1 {
        let sum: f32 = us_alphas.iter().sum();
        let norm = sum / (tokens.len() + 1) as f32;
        let alphas: Vec<f32> = us_alphas.iter().map(|a| a / norm).collect();
        peaks = cif_wo_hidden(&alphas, thr);
        fire = places(&peaks);
    }
    if fire.is_empty() {
        return Vec::new();
    }
    let num_frames = peaks.len() as f64;
    let mut stamps: Vec<[f64; 2]> = Vec::new();
    let mut is_token: Vec<bool> = Vec::new();
    if fire[0] > START_END_THRESHOLD {
        stamps.push([0.0, fire[0] * time_rate]);
        is_token.push(false);
    }
    for i in 0..fire.len() - 1 {
        is_token.push(i < tokens.len());
        if fire[i + 1] - fire[i] <= MAX_TOKEN_DURATION {
            stamps.push([fire[i] * time_rate, fire[i + 1] * time_rate]);
        } else {
            let split = fire[i] + MAX_TOKEN_DURATION;
            stamps.push([fire[i] * time_rate, split * time_rate]);
            stamps.push([split * time_rate, fire[i + 1] * time_rate]);
            is_token.push(false);
        }
    }
    let last = fire[fire.len() - 1];
    if num_frames - last > START_END_THRESHOLD {
        let end = (num_frames + last) * 0.5;
        if let Some(s) = stamps.last_mut() {
            s[1] = end * time_rate;
        }
        stamps.push([end * time_rate, num_frames * time_rate]);
        is_token.push(false);
    } else if let Some(s) = stamps.last_mut() {
        s[1] = num_frames * time_rate;
    }
    // Python `int(x * 1000)` truncates toward zero, as `as i64` does.
    stamps
        .iter()
        .zip(&is_token)
        .filter(|(_, t)| **t)
        .map(|(s, _)| [(s[0] * 1000.0) as i64, (s[1] * 1000.0) as i64])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn joins() {
        assert_eq!(sentence_postprocess(&s(&["你", "好"])), "你好");
        assert_eq!(
            sentence_postprocess(&s(&["hel@@", "lo", "world"])),
            "hello world"
        );
        assert_eq!(sentence_postprocess(&s(&["a", "b", "c"])), "ABC");
        assert_eq!(sentence_postprocess(&[]), "");
    }
}
