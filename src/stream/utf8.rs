//! Print generated tokens as text without splitting a UTF-8 character across tokens: bytes
//! are held back until they complete a character.

#[derive(Debug, Default)]
/// Bytes held back until they complete a UTF-8 character.
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add a token's bytes; returns the text that is complete now.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let ok = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[..ok]).expect("valid prefix"));
                    match e.error_len() {
                        // an incomplete character at the end: wait for the next token
                        None => {
                            self.pending.drain(..ok);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..ok + bad);
                        }
                    }
                }
            }
        }
    }

    /// What is left at the end of a reply (an unfinished character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_split_characters() {
        let mut u = Utf8Stream::default();
        let s = "héllo 🐋!".as_bytes();
        // split inside é (2 bytes) and inside the whale (4 bytes)
        let whale = s.iter().position(|&b| b == 0xF0).unwrap();
        let mut out = String::new();
        out += &u.push(&s[..2]);
        assert_eq!(out, "h");
        out += &u.push(&s[2..whale + 1]);
        out += &u.push(&s[whale + 1..whale + 3]);
        assert_eq!(out, "héllo ");
        out += &u.push(&s[whale + 3..]);
        out += &u.finish();
        assert_eq!(out, "héllo 🐋!");
    }

    #[test]
    fn invalid_bytes_become_replacement() {
        let mut u = Utf8Stream::default();
        assert_eq!(u.push(&[b'a', 0xFF, b'b']), "a\u{FFFD}b");
        assert_eq!(u.push(&[0xE2, 0x82]), "");
        assert_eq!(u.finish(), "\u{FFFD}");
    }
}
