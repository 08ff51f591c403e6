//! SirLLM's DailyDialog protocol on the chit-chat dialogues (pure part): parse the
//! dataset, pick long dialogues, and build multiple-choice questions: at chosen turns, the
//! true next utterance among four (three distractors from other dialogues).

use std::collections::BTreeMap;

use crate::rng::SplitMix64;

/// One dialogue: utterances in order, speakers alternating (consecutive messages of one
/// sender are joined into one turn).
#[derive(Debug, Clone, PartialEq)]
pub struct Dialogue {
    /// Dataset id.
    pub id: String,
    /// Utterances, speakers alternating.
    pub turns: Vec<String>,
}

#[derive(serde::Deserialize)]
struct RawMsg {
    text: String,
    sender: String,
}

#[derive(serde::Deserialize)]
struct RawConv {
    messages: Vec<Vec<RawMsg>>,
}

/// Parse the chit-chat dataset (`{id: {messages: [[{text, sender}, ...], ...]}}`). Dialogues
/// come sorted by id; messages of one sender in a row become one turn; blank text dropped.
pub fn parse_chitchat(json: &str) -> Result<Vec<Dialogue>, String> {
    let raw: BTreeMap<String, RawConv> = serde_json::from_str(json).map_err(|e| format!("not a chit-chat dataset file: {e}"))?;
    let mut out = vec![];
    for (id, conv) in raw {
        let mut turns: Vec<(String, String)> = vec![];
        for group in conv.messages {
            for m in group {
                let t = m.text.split_whitespace().collect::<Vec<_>>().join(" ");
                if t.is_empty() {
                    continue;
                }
                match turns.last_mut() {
                    Some((s, text)) if *s == m.sender => {
                        text.push(' ');
                        text.push_str(&t);
                    }
                    _ => turns.push((m.sender, t)),
                }
            }
        }
        out.push(Dialogue { id, turns: turns.into_iter().map(|(_, t)| t).collect() });
    }
    Ok(out)
}

/// Which dialogues and turns are asked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DialogSpec {
    /// Questions wanted in all (dialogues are added until there are this many).
    pub questions: usize,
    /// Dialogues need at least this many turns.
    pub min_turns: usize,
    /// And at most this many characters (so the full-cache reference fits).
    pub max_chars: usize,
    /// Utterances longer than this (characters) are neither asked nor used as distractors.
    pub max_turn_chars: usize,
    /// Ask at turns `first, first + every, ...`.
    pub first: usize,
    /// Then every this many turns.
    pub every: usize,
    /// Seed of the choices.
    pub seed: u64,
}

impl Default for DialogSpec {
    fn default() -> Self {
        DialogSpec { questions: 200, min_turns: 24, max_chars: 6000, max_turn_chars: 300, first: 8, every: 4, seed: 0 }
    }
}

/// One question: at `turn` of dialogue `dialogue`, candidates with the true one at `answer`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Question {
    /// Dialogue index.
    pub dialogue: usize,
    /// Turn asked at.
    pub turn: usize,
    /// Candidate utterances.
    pub candidates: Vec<String>,
    /// Index of the true one.
    pub answer: usize,
}

/// The dialogues to stream (indices into `all`) and their questions, in streaming order.
pub fn build(all: &[Dialogue], spec: &DialogSpec) -> (Vec<usize>, Vec<Question>) {
    let ok_len = |t: &String| t.chars().count() <= spec.max_turn_chars;
    let mut eligible: Vec<usize> = (0..all.len())
        .filter(|&i| {
            let d = &all[i];
            d.turns.len() >= spec.min_turns && d.turns.iter().map(|t| t.len()).sum::<usize>() <= spec.max_chars
        })
        .collect();
    let mut rng = SplitMix64(spec.seed ^ 0x00D1_A106);
    shuffle(&mut eligible, &mut rng);
    // distractor pool: utterances of every eligible dialogue
    let pool: Vec<(usize, usize)> = eligible.iter().flat_map(|&d| (0..all[d].turns.len()).filter(move |&t| ok_len(&all[d].turns[t])).map(move |t| (d, t))).collect();
    let mut chosen = vec![];
    let mut questions = vec![];
    for &d in &eligible {
        if questions.len() >= spec.questions || pool.is_empty() {
            break;
        }
        let turns = &all[d].turns;
        let mut added = false;
        let mut t = spec.first.max(1);
        while t < turns.len() && questions.len() < spec.questions {
            if ok_len(&turns[t]) {
                let mut cands = vec![turns[t].clone()];
                let mut guard = 0;
                while cands.len() < 4 && guard < 1000 {
                    guard += 1;
                    let (od, ot) = pool[(rng.next_u64() % pool.len() as u64) as usize];
                    let c = &all[od].turns[ot];
                    if od != d && !cands.contains(c) {
                        cands.push(c.clone());
                    }
                }
                if cands.len() == 4 {
                    let answer = (rng.next_u64() % 4) as usize;
                    cands.swap(0, answer);
                    questions.push(Question { dialogue: d, turn: t, candidates: cands, answer });
                    added = true;
                }
            }
            t += spec.every.max(1);
        }
        if added {
            chosen.push(d);
        }
    }
    (chosen, questions)
}

fn shuffle<T>(v: &mut [T], rng: &mut SplitMix64) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_json() -> String {
        let mut convs = vec![];
        for c in 0..6 {
            let mut msgs = vec![];
            for t in 0..30 {
                let who = if t % 2 == 0 { "a" } else { "b" };
                msgs.push(format!(r#"[{{"text": "c{c} turn {t}", "timestamp": "x", "sender": "{who}"}}, {{"text": " more  ", "timestamp": "x", "sender": "{who}"}}]"#));
            }
            convs.push(format!(r#""id{c}": {{"messages": [{}], "ratings": {{}}, "start": "x", "prompt": "p"}}"#, msgs.join(",")));
        }
        format!("{{{}}}", convs.join(","))
    }

    #[test]
    fn parses_and_joins_one_senders_messages() {
        let d = parse_chitchat(&sample_json()).unwrap();
        assert_eq!(d.len(), 6);
        assert_eq!(d[0].id, "id0");
        assert_eq!(d[0].turns.len(), 30);
        assert_eq!(d[0].turns[3], "c0 turn 3 more");
        assert!(parse_chitchat("[1, 2]").is_err());
    }

    #[test]
    fn questions_hold_the_truth_and_three_foreign_distractors() {
        let d = parse_chitchat(&sample_json()).unwrap();
        let spec = DialogSpec { questions: 20, min_turns: 20, first: 4, every: 4, ..Default::default() };
        let (chosen, qs) = build(&d, &spec);
        assert_eq!(qs.len(), 20);
        assert!(!chosen.is_empty());
        for q in &qs {
            assert!(chosen.contains(&q.dialogue));
            assert_eq!(q.candidates.len(), 4);
            assert_eq!(q.candidates[q.answer], d[q.dialogue].turns[q.turn]);
            let own = format!("c{} ", q.dialogue);
            for (i, c) in q.candidates.iter().enumerate() {
                if i != q.answer {
                    assert!(!c.starts_with(&own), "distractor from the same dialogue: {c}");
                }
            }
            assert!(q.turn >= 4 && (q.turn - 4) % 4 == 0);
        }
        // the answer position is spread (not always the same slot)
        let slots: std::collections::HashSet<usize> = qs.iter().map(|q| q.answer).collect();
        assert!(slots.len() > 1);
        // seeded
        assert_eq!(build(&d, &spec).1, qs);
        let other = build(&d, &DialogSpec { seed: 9, ..spec.clone() }).1;
        assert_ne!(other, qs);
    }

    #[test]
    fn short_dialogues_are_skipped() {
        let d = parse_chitchat(&sample_json()).unwrap();
        let (chosen, qs) = build(&d, &DialogSpec { min_turns: 31, ..Default::default() });
        assert!(chosen.is_empty() && qs.is_empty());
    }
}
