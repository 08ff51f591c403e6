//! Evaluations: the compress-once pipeline and the long-context tasks with their scoring
//! (`long`, Table 1), perplexity of a long text through a bounded cache (`stream`), and
//! response selection on dialogues streamed through a bounded cache (`dialog`, Table 2).
pub mod dialog;
pub mod long;
pub mod pipeline;
pub mod score;
pub mod stream;
pub mod tasks;

/// The files of an answer-level evaluation: every answer, the accuracy table as CSV and
/// Markdown, and `meta.json`.
fn answer_files(results: String, table: String, md: String, meta: &serde_json::Value) -> crate::output::Files {
    let mut files = crate::output::Files::default();
    files.text("results.csv", results);
    files.text("table.csv", table);
    files.text("table.md", md);
    files.json("meta.json", meta);
    files
}
