//! Answer scoring (RULER's string match): lower-case, punctuation and articles dropped,
//! whitespace collapsed; correct when any reference answer appears in the output.

/// Normalised text for matching.
pub fn normalize(s: &str) -> String {
    let lower: String = s.to_lowercase().chars().map(|c| if c.is_alphanumeric() { c } else { ' ' }).collect();
    lower.split_whitespace().filter(|w| !matches!(*w, "a" | "an" | "the")).collect::<Vec<_>>().join(" ")
}

/// Does `output` contain any of `answers` (as whole normalised words)?
pub fn matches(output: &str, answers: &[String]) -> bool {
    let o = format!(" {} ", normalize(output));
    answers.iter().any(|a| {
        let a = normalize(a);
        !a.is_empty() && o.contains(&format!(" {a} "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matching_by_hand() {
        assert!(matches(" 71432. Remember", &["71432".into()]));
        assert!(!matches("714321", &["71432".into()]), "digits must match whole");
        assert!(matches("It is in France, I think", &["France".into(), "Normandy".into()]));
        assert!(matches("The Beatles!", &["the beatles".into()]));
        assert!(!matches("", &["x".into()]));
        assert!(!matches("anything", &["".into()]));
        assert_eq!(normalize("  The  Pass-Key, is: 5 "), "pass key is 5");
    }
}
