//! Evaluations: the compress-once pipeline and the long-context tasks with their scoring
//! (`long`, Table 1), perplexity of a long text through a bounded cache (`stream`), and
//! response selection on dialogues streamed through a bounded cache (`dialog`, Table 2).
pub mod dialog;
pub mod long;
pub mod pipeline;
pub mod score;
pub mod stream;
pub mod tasks;
