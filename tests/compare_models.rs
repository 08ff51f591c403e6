//! `quantize` and `compare` on the two real models: a q8_0 and a q2_k rung are made from the
//! shipped file, and the comparison of source, q8_0 and q2_k gives finite perplexities,
//! correlations in range, q8_0 closer to the source than q2_k, every table and figure, and
//! kept sets of model-free policies identical by construction.

mod common;

use common::{bin, model_path, num, read_csv, GEMMA, SMOL};


fn ladder_and_compare(name: &str, stem: &str, n_layer: usize) {
    let _one = common::one_at_a_time();
    let d = tempfile::tempdir().unwrap();
    let src = model_path(name);
    let ladder = d.path().join("ladder");
    let o = bin().args(["quantize", "--model"]).arg(&src).args(["--types", "q8_0,q2_k", "--out"]).arg(&ladder).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("source is itself quantized"), "the shipped files are quantized");
    let out = d.path().join("cmp");
    let o = bin()
        .args(["compare", "--model"])
        .arg(&src)
        .arg("--model")
        .arg(ladder.join(format!("{stem}.q8_0.gguf")))
        .arg("--model")
        .arg(ladder.join(format!("{stem}.q2_k.gguf")))
        .args(["--docs", "2", "--max-tokens", "256", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["models.csv", "layers.csv", "pairs_layers.csv", "pairs_policies.csv", "pairs.csv", "report.md", "meta.json", "layer_curves.png", "jaccard_vs_reference.png", "jaccard_vs_reference.svg", "kept_overlap_vs_reference.png"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let models = read_csv(&out.join("models.csv"));
    assert_eq!(models.len(), 3);
    assert_eq!(models[1]["label"], "q8_0");
    assert_eq!(models[2]["label"], "q2_k");
    for m in &models {
        let p = num(m, "perplexity");
        assert!(p.is_finite() && p > 1.0, "{}: perplexity {p}", m["label"]);
    }
    let layers = read_csv(&out.join("pairs_layers.csv"));
    assert_eq!(layers.len(), 3 * n_layer, "three pairs x layers");
    for r in &layers {
        let rho = num(r, "received_spearman");
        assert!((-1.0..=1.0).contains(&rho), "{r:?}");
        let j = num(r, "attractor_jaccard");
        assert!((0.0..=1.0).contains(&j), "{r:?}");
    }
    let pairs = read_csv(&out.join("pairs.csv"));
    let q8 = pairs.iter().find(|r| r["label_b"] == "q8_0" && r["model_a"] == "0").unwrap();
    let q2 = pairs.iter().find(|r| r["label_b"] == "q2_k" && r["model_a"] == "0").unwrap();
    let (r8, r2) = (num(q8, "mean_received_spearman"), num(q2, "mean_received_spearman"));
    assert!(r8 > 0.97, "q8_0 of the source ranks received attention like the source: rho {r8}");
    assert!(r8 > r2, "q8_0 ({r8}) closer to the source than q2_k ({r2})");
    assert!(num(q8, "mean_attractor_jaccard") > num(q2, "mean_attractor_jaccard"));
    for r in read_csv(&out.join("pairs_policies.csv")) {
        let o = num(&r, "kept_overlap");
        assert!((0.0..=1.0).contains(&o), "{r:?}");
        if ["frequency", "streaming", "random"].contains(&r["policy"].as_str()) {
            assert_eq!(o, 1.0, "{} chooses from token ids and positions only", r["policy"]);
        }
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## Where the models agree and where they part"));
}

#[test]
fn smollm2_ladder_compare() {
    ladder_and_compare(SMOL, "SmolLM2-135M-Instruct", 30);
}

#[test]
fn gemma3_ladder_compare() {
    ladder_and_compare(GEMMA, "gemma-3-270m", 18);
}
