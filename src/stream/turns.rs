//! A conversation rendered turn by turn with the model's chat template: each new message
//! becomes the text the template adds for it (the difference of two renderings), so turns
//! can be streamed into the cache one at a time.

use crate::ffi::Model;

/// A conversation rendered turn by turn with the model's chat template.
pub struct Transcript<'m> {
    model: &'m Model,
    msgs: Vec<(String, String)>,
    /// Text rendered so far (what the cache has seen, evictions aside).
    rendered: String,
    started: bool,
    /// The model has a chat template (else "Role: text" lines).
    templated: bool,
}

/// A turn's new text split where its content starts: `header` (role markers), `rest`
/// (content and end-of-turn markers).
#[derive(Debug, Clone, PartialEq)]
pub struct TurnText {
    /// Role markers.
    pub header: String,
    /// Content and end-of-turn markers.
    pub rest: String,
}

impl<'m> Transcript<'m> {
    /// An empty transcript (plain `Role: text` lines when the model has no template).
    pub fn new(model: &'m Model) -> Transcript<'m> {
        let templated = model.apply_chat_template(&[("user", "x")], true).is_ok();
        Transcript { model, msgs: vec![], rendered: String::new(), started: false, templated }
    }

    fn render(&self, msgs: &[(String, String)], add_assistant: bool) -> String {
        if self.templated {
            let m: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (r.as_str(), c.as_str())).collect();
            if let Ok(s) = self.model.apply_chat_template(&m, add_assistant) {
                return s;
            }
        }
        let mut s: String = msgs.iter().map(|(r, c)| format!("{}: {c}\n", capitalize(r))).collect();
        if add_assistant {
            s.push_str("Assistant:");
        }
        s
    }

    /// The text `(role, content)` would add, split at the content, without adding it.
    pub fn peek(&self, role: &str, content: &str) -> TurnText {
        let mut msgs = self.msgs.clone();
        msgs.push((role.to_string(), content.to_string()));
        let full = self.render(&msgs, false);
        let new = full.strip_prefix(&self.rendered).unwrap_or(&full).to_string();
        match new.find(content).filter(|_| !content.is_empty()) {
            Some(i) => TurnText { header: new[..i].to_string(), rest: new[i..].to_string() },
            None => TurnText { header: String::new(), rest: new },
        }
    }

    /// Add a message; returns the text the template adds for it.
    pub fn push(&mut self, role: &str, content: &str) -> TurnText {
        let t = self.peek(role, content);
        self.msgs.push((role.to_string(), content.to_string()));
        self.rendered = self.render(&self.msgs, false);
        t
    }

    /// The assistant's opening (after the last message); the caller then generates.
    pub fn open_assistant(&self) -> String {
        let with = self.render(&self.msgs, true);
        with.strip_prefix(&self.rendered).unwrap_or("").to_string()
    }

    /// Tokenize a piece of the conversation: the first piece gets the model's BOS when it
    /// wants one and the template did not write it.
    pub fn tokenize(&mut self, text: &str) -> anyhow::Result<Vec<i32>> {
        let first = !self.started;
        self.started = true;
        let bos_in_text = self.model.bos().is_some_and(|b| {
            let s = String::from_utf8_lossy(&self.model.token_bytes(b, true)).into_owned();
            !s.is_empty() && text.starts_with(&s)
        });
        Ok(self.model.tokenize(text, first && !bos_in_text, true)?)
    }

    /// Forget every message (a new conversation).
    pub fn clear(&mut self) {
        self.msgs.clear();
        self.rendered.clear();
        self.started = false;
    }

    /// Messages so far `(role, text)`.
    pub fn messages(&self) -> &[(String, String)] {
        &self.msgs
    }
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}
