//! Which tokens are attractors (Fig. 6, 7): shares per layer and per layer band.

use std::collections::HashMap;

/// Attractor occurrences per token string.
#[derive(Debug, Clone, Default)]
pub struct TokenCounts {
    /// Count per token text.
    pub counts: HashMap<String, u64>,
    /// Tokens counted.
    pub total: u64,
}

impl TokenCounts {
    /// Count the tokens whose flag is set.
    pub fn add(&mut self, flags: &[bool], tokens: &[String]) {
        for (f, t) in flags.iter().zip(tokens) {
            if *f {
                *self.counts.entry(t.clone()).or_default() += 1;
                self.total += 1;
            }
        }
    }

    /// Add another count's tokens.
    pub fn merge(&mut self, other: &TokenCounts) {
        for (k, v) in &other.counts {
            *self.counts.entry(k.clone()).or_default() += v;
        }
        self.total += other.total;
    }

    /// The `k` tokens with most attractor occurrences: `(token, count, share of all
    /// attractors)`, ties by token string.
    pub fn top(&self, k: usize) -> Vec<(String, u64, f64)> {
        let mut v: Vec<(&String, &u64)> = self.counts.iter().collect();
        v.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        v.into_iter().take(k).map(|(t, &c)| (t.clone(), c, c as f64 / self.total.max(1) as f64)).collect()
    }
}

/// Layer bands: thirds of the layers (shallow, middle, deep), sizes differing by at most 1.
pub fn layer_bands(n_layer: usize) -> [(&'static str, std::ops::Range<usize>); 3] {
    let a = n_layer.div_ceil(3);
    let b = (n_layer - a).div_ceil(2) + a;
    [("shallow", 0..a), ("middle", a..b), ("deep", b..n_layer)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_bands() {
        let toks: Vec<String> = ["the", "cat", "the", ".", "\n"].iter().map(|s| s.to_string()).collect();
        let mut c = TokenCounts::default();
        c.add(&[true, false, true, true, false], &toks);
        let top = c.top(2);
        assert_eq!(top[0], ("the".to_string(), 2, 2.0 / 3.0));
        assert_eq!(top[1], (".".to_string(), 1, 1.0 / 3.0));
        let mut d = TokenCounts::default();
        d.add(&[false, false, false, false, true], &toks);
        c.merge(&d);
        assert_eq!(c.total, 4);
        assert_eq!(c.top(1)[0].2, 0.5);
        let b = layer_bands(30);
        assert_eq!((b[0].1.clone(), b[1].1.clone(), b[2].1.clone()), (0..10, 10..20, 20..30));
        let b = layer_bands(18);
        assert_eq!(b[2].1, 12..18);
        let b = layer_bands(4);
        assert_eq!((b[0].1.clone(), b[1].1.clone(), b[2].1.clone()), (0..2, 2..3, 3..4));
    }
}

/// English function words (articles, pronouns, prepositions, conjunctions, auxiliaries).
const FUNCTION_WORDS: &[&str] = &[
    "a", "an", "the", "and", "or", "but", "nor", "so", "yet", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "into", "onto", "upon",
    "about", "over", "under", "than", "then", "that", "this", "these", "those", "there", "here", "it", "its", "is", "are", "was", "were", "be", "been",
    "being", "am", "do", "does", "did", "have", "has", "had", "will", "would", "shall", "should", "can", "could", "may", "might", "must", "i", "me", "my",
    "we", "us", "our", "you", "your", "he", "him", "his", "she", "her", "they", "them", "their", "who", "whom", "whose", "which", "what", "when", "where",
    "why", "how", "not", "no", "all", "any", "some", "such", "if", "s", "t", "d", "ll", "re", "ve", "m", "one", "up", "out", "down", "off", "through",
];

/// A low-semantic token: whitespace, punctuation or an English function word (case and
/// surrounding spaces ignored). The criterion the report uses for the paper's claim that
/// shallow-layer attractors are low-semantic.
pub fn is_low_semantic(token: &str) -> bool {
    let t = token.trim_matches(|c: char| c.is_whitespace() || c == '\u{2581}' || c == '\u{0120}');
    if t.is_empty() || t.chars().all(|c| !c.is_alphanumeric()) {
        return true;
    }
    let lower = t.to_lowercase();
    FUNCTION_WORDS.contains(&lower.as_str())
}

/// Share of a count table's occurrences that are low-semantic tokens.
pub fn low_semantic_share(c: &TokenCounts) -> f64 {
    if c.total == 0 {
        return f64::NAN;
    }
    c.counts.iter().filter(|(t, _)| is_low_semantic(t)).map(|(_, &n)| n).sum::<u64>() as f64 / c.total as f64
}

#[cfg(test)]
mod low_semantic_tests {
    use super::*;

    #[test]
    fn classifies_tokens() {
        for t in [" the", "\n", ".", "\u{2581}of", "The", "’", " ,", "  "] {
            assert!(is_low_semantic(t), "{t:?}");
        }
        for t in [" whale", "Ishmael", "ship", " 42"] {
            assert!(!is_low_semantic(t), "{t:?}");
        }
        let toks: Vec<String> = [" the", " whale", ".", " sea"].iter().map(|s| s.to_string()).collect();
        let mut c = TokenCounts::default();
        c.add(&[true; 4], &toks);
        assert_eq!(low_semantic_share(&c), 0.5);
    }
}
