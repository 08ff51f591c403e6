//! `frequency` (Sec. 3.3): keep tokens in the top-K frequent list (low-semantic tokens).
//! In a bounded stream the paper "adopts the SirLLM implementation but replaces its token
//! selection with the frequency criterion" (Sec. 3.3): a recent window takes
//! `recent_share` of the budget, frequent tokens the rest, decayed by `decay` per turn of age.
//! Its defaults are SirLLM's published setup (recent share 0, decay 0.7);
//! `frequency:recent=0.5` reserves half the budget for recent tokens.
use std::collections::HashSet;

use super::{recency, Needs, Observation, Policy, PolicyError, Scores};

/// Keeps the tokens of a frequency list (score 1) over the others (score 0).
pub struct Frequency {
    frequent: HashSet<i32>,
    /// Share of the budget for a recent window in a stream.
    pub recent_share: f64,
    /// Decay per dialogue turn of age in a stream.
    pub decay: f64,
}

impl Frequency {
    /// The policy for the token ids `frequent`, with SirLLM's stream defaults.
    pub fn new(frequent: &[i32]) -> Frequency {
        Frequency { frequent: frequent.iter().copied().collect(), recent_share: 0.0, decay: 0.7 }
    }
}

impl Policy for Frequency {
    fn name(&self) -> &'static str {
        "frequency"
    }
    fn needs(&self) -> Needs {
        Needs::default()
    }
    fn streaming(&self) -> bool {
        true
    }
    fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
        let n = obs.n;
        let freq = |j: usize| obs.tokens.get(j).is_some_and(|t| self.frequent.contains(t)) as u8 as f64;
        if !obs.streaming {
            return Ok(Scores::Shared((0..n).map(freq).collect()));
        }
        let recent = ((obs.budget as f64 * self.recent_share).round() as usize).min(n);
        let last_turn = obs.turn.and_then(|t| t.iter().take(n).max().copied()).unwrap_or(0);
        Ok(Scores::Shared(
            (0..n)
                .map(|j| {
                    if j + recent >= n {
                        return 2.0 + recency(j, n);
                    }
                    let age = obs.turn.map_or(0, |t| last_turn - t.get(j).copied().unwrap_or(last_turn).min(last_turn));
                    freq(j) * self.decay.powi(age as i32)
                })
                .collect(),
        ))
    }
}

/// A frequency list: the corpus's most frequent token ids under one model's tokenizer.
/// File format (CSV with `#` header lines naming the vocabulary and the corpus):
/// ```text
/// # attractors frequency list
/// # vocab: <fingerprint> (<n> tokens, <model name>)
/// # corpus: <files> (<tokens> tokens)
/// rank,token_id,count,share,token
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct FreqList {
    /// The vocabulary it was built with (fingerprint, size, model name).
    pub vocab: String,
    /// The corpus it was counted on.
    pub corpus: String,
    /// `(token id, count, share, token text)` by decreasing count.
    pub entries: Vec<(i32, u64, f64, String)>,
}

impl FreqList {
    /// The top `k` of `counts` (per token id), ties by id.
    pub fn from_counts(counts: &std::collections::HashMap<i32, u64>, k: usize, text: impl Fn(i32) -> String, vocab: String, corpus: String) -> FreqList {
        let total: u64 = counts.values().sum();
        let mut v: Vec<(i32, u64)> = counts.iter().map(|(&t, &c)| (t, c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let entries = v.into_iter().take(k).map(|(t, c)| (t, c, c as f64 / total.max(1) as f64, text(t))).collect();
        FreqList { vocab, corpus, entries }
    }

    /// The token ids, most frequent first.
    pub fn ids(&self) -> Vec<i32> {
        self.entries.iter().map(|e| e.0).collect()
    }

    /// The list file's text.
    pub fn to_csv(&self) -> String {
        let mut s = format!("# attractors frequency list\n# vocab: {}\n# corpus: {}\nrank,token_id,count,share,token\n", self.vocab, self.corpus);
        for (k, (t, c, sh, txt)) in self.entries.iter().enumerate() {
            s.push_str(&format!("{},{t},{c},{sh:.6e},{}\n", k + 1, crate::output::csv_field(&crate::output::escape_token(txt))));
        }
        s
    }

    /// Read a list file's text.
    pub fn parse(s: &str) -> Result<FreqList, String> {
        let mut vocab = None;
        let mut corpus = String::new();
        let mut entries = vec![];
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("# vocab: ") {
                vocab = Some(v.to_string());
            } else if let Some(c) = line.strip_prefix("# corpus: ") {
                corpus = c.to_string();
            } else if line.starts_with('#') || line.starts_with("rank,") || line.is_empty() {
                continue;
            } else {
                let f: Vec<&str> = line.splitn(5, ',').collect();
                if f.len() < 4 {
                    return Err(format!("bad frequency-list line {line:?}"));
                }
                let id = f[1].parse().map_err(|_| format!("bad token id in {line:?}"))?;
                let count = f[2].parse().map_err(|_| format!("bad count in {line:?}"))?;
                let share = f[3].parse().map_err(|_| format!("bad share in {line:?}"))?;
                entries.push((id, count, share, f.get(4).unwrap_or(&"").to_string()));
            }
        }
        let vocab = vocab.ok_or("not a frequency list (no '# vocab:' line): build one with `attractors freq build`")?;
        Ok(FreqList { vocab, corpus, entries })
    }

    /// The vocabulary fingerprint part of the `vocab` header.
    pub fn fingerprint(&self) -> &str {
        self.vocab.split_whitespace().next().unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_round_trips_and_orders() {
        let counts: std::collections::HashMap<i32, u64> = [(5, 10), (7, 30), (9, 10), (1, 50)].into_iter().collect();
        let l = FreqList::from_counts(&counts, 3, |t| if t == 7 { "a,b\n".into() } else { format!("t{t}") }, "abc123 (10 tokens, m)".into(), "x.txt (100 tokens)".into());
        assert_eq!(l.ids(), vec![1, 7, 5]);
        assert!((l.entries[0].2 - 0.5).abs() < 1e-12);
        let back = FreqList::parse(&l.to_csv()).unwrap();
        assert_eq!(back.ids(), l.ids());
        assert_eq!(back.fingerprint(), "abc123");
        assert_eq!(back.corpus, "x.txt (100 tokens)");
        assert!(FreqList::parse("rank,token_id\n1,2,3,0.1,x\n").is_err());
    }

    #[test]
    fn streaming_keeps_a_recent_window_then_frequent_tokens_of_newer_turns() {
        use crate::evict::select::keep_cells;
        let p = Frequency { recent_share: 0.5, ..Frequency::new(&[1]) };
        // 12 slots: tokens 1 (frequent) and 0; turns 0,0,0,0,1,1,1,1,2,2,2,2
        let tokens = [0, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0];
        let turn: Vec<u32> = (0..12).map(|j| (j / 4) as u32).collect();
        let obs = Observation { n: 12, tokens: &tokens, budget: 6, turn: Some(&turn), streaming: true, ..Observation::default() };
        let Scores::Shared(s) = p.score(&obs).unwrap() else { panic!("shared scores") };
        // the last 3 (half of 6) are the recent window, above everything
        assert!(s[9..].iter().all(|&x| x > 2.0));
        // frequent tokens decay with turn age: turn 1 (age 1) 0.7, turn 0 (age 2) 0.49
        assert!((s[4] - 0.7).abs() < 1e-12 && (s[1] - 0.49).abs() < 1e-12);
        assert_eq!(s[0], 0.0);
        let keep = keep_cells(&Scores::Shared(s), 12, 6, 1);
        // sink 0, window 9..12, then the two newest frequent tokens (6, 4)
        assert_eq!(keep, vec![true, false, false, false, true, false, true, false, false, true, true, true]);
        // compress-once scoring is the plain 0/1 membership
        let once = Observation { streaming: false, ..obs };
        assert_eq!(p.score(&once).unwrap(), Scores::Shared(tokens.iter().map(|&t| (t == 1) as u8 as f64).collect()));
        // SirLLM's published setup (the default): no recent window. Frequent tokens of the
        // newest turns first (6: 0.7, 4: 0.7, then 3 and 1: 0.49), then ties to the later.
        let keep = keep_cells(&Frequency::new(&[1]).score(&obs).unwrap(), 12, 6, 1);
        assert_eq!(keep, vec![true, true, false, true, true, false, true, false, false, false, false, true]);
    }
}
