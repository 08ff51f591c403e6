//! `attractors compare` on the tiny seeded model: a model compared with itself agrees fully
//! (Jaccard 1, rho 1, every kept set identical); a ladder made from the tiny F32 model
//! orders as expected (q8_0 closer to F32 than the 2-bit rung on received attention);
//! the comparison's received-attention rho equals one computed here from the two models'
//! captures; bad input (another vocabulary, another shape, a full disk, a read-only
//! output) is a one-line error that leaves no output file.

mod common;

use std::path::{Path, PathBuf};

use attractors::analysis::stats::spearman;
use attractors::capture::{new_capture, CaptureConfig};
use attractors::ffi::{Context, Model, ModelParams};
use attractors::session::feed;
use attractors::test_support::{TinyConfig, TinyModel};
use common::{bin, num, read_csv, tiny_params};

const TEXT: &str = "The whale and the sea. Of the ship, a man; the rope and the sail. \
    Then the old sailor said that the sea was a road, and the whale a town on it.\n";

/// Policies that need no frequency list or calibration file.
const POLICIES: &str = "l2norm,h2o,tova,snapkv,streaming,sirllm,random";

fn setup(d: &Path) -> (PathBuf, PathBuf) {
    let model = d.join("tiny.f32.gguf");
    TinyModel::new(TinyConfig::default()).write_gguf(&model).unwrap();
    let text = d.join("text.txt");
    std::fs::write(&text, TEXT.repeat(8)).unwrap();
    (model, text)
}

fn compare(models: &[&Path], text: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut c = bin();
    c.arg("compare");
    for m in models {
        c.arg("--model").arg(m);
    }
    c.arg("--corpus").arg(text).args(["--max-tokens", "96", "--docs", "3", "--min-tokens", "16", "--kv-type", "f32", "--threads", "2", "--policies", POLICIES]).args(extra).arg("--out").arg(out);
    c.output().unwrap()
}

fn listing(d: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d).map(|r| r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_model_compared_with_itself_agrees_fully() {
    let d = tempfile::tempdir().unwrap();
    let (model, text) = setup(d.path());
    let out = d.path().join("out");
    let o = compare(&[&model, &model], &text, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in ["models.csv", "layers.csv", "pairs_layers.csv", "pairs_policies.csv", "pairs.csv", "report.md", "meta.json", "layer_curves.png", "layer_curves.svg", "jaccard_vs_reference.png", "jaccard_vs_reference.svg", "spearman_vs_reference.png", "kept_overlap_vs_reference.svg"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    assert!(listing(&out).iter().all(|n| !n.starts_with('.')), "staging left behind: {:?}", listing(&out));
    let layers = read_csv(&out.join("pairs_layers.csv"));
    assert_eq!(layers.len(), 3, "one row per layer of the one pair");
    for r in &layers {
        assert_eq!(num(r, "attractor_jaccard"), 1.0, "layer {}", r["layer"]);
        assert!((num(r, "received_spearman") - 1.0).abs() < 1e-9, "layer {}", r["layer"]);
        assert_eq!(num(r, "docs"), 3.0);
        assert_eq!(r["first_share_a"], r["first_share_b"]);
        if !r["dim_a"].is_empty() {
            assert_eq!(r["same_dim"], "1");
        }
    }
    let pol = read_csv(&out.join("pairs_policies.csv"));
    assert_eq!(pol.len(), POLICIES.split(',').count());
    for r in &pol {
        assert_eq!(num(r, "kept_overlap"), 1.0, "{}", r["policy"]);
        assert_eq!(num(r, "kept_jaccard"), 1.0, "{}", r["policy"]);
    }
    let models = read_csv(&out.join("models.csv"));
    assert_eq!(models[0]["label"], "f32");
    assert_eq!(models[1]["label"], "f32#2");
    assert_eq!(models[0]["perplexity"], models[1]["perplexity"]);
    assert!(num(&models[0], "perplexity").is_finite());
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["parameters"]["ratio"], 0.5);
    assert_eq!(meta["documents"].as_array().unwrap().len(), 3);
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("agrees closely with the reference"), "{report}");
}

/// `R[l, .]` of each document under one model, from its own capture (self excluded).
fn received(model: &Path, docs: &[Vec<i32>]) -> Vec<Vec<Vec<f64>>> {
    let m = Model::load(model, &ModelParams::default()).unwrap();
    let cfg = CaptureConfig { distance: false, activation: None, ..CaptureConfig::default() };
    let (hook, handle) = new_capture(&m, &cfg, &[], 256).unwrap();
    let mut ctx = Context::new(&m, &tiny_params(), Some(Box::new(hook))).unwrap();
    docs.iter()
        .map(|d| {
            ctx.clear();
            handle.reset();
            feed(&mut ctx, d, false, |_| {}).unwrap();
            handle.take_summary().attention.unwrap().received
        })
        .collect()
}

#[test]
fn a_ladder_orders_by_precision_and_rho_matches_the_captures() {
    let d = tempfile::tempdir().unwrap();
    let (model, text) = setup(d.path());
    let ladder = d.path().join("ladder");
    let o = bin().args(["quantize", "--model"]).arg(&model).args(["--types", "f32,q8_0,q2_k", "--out"]).arg(&ladder).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rungs: Vec<PathBuf> = ["f32", "q8_0", "q2_k"].iter().map(|t| ladder.join(format!("tiny.{t}.gguf"))).collect();
    let out = d.path().join("out");
    let o = compare(&[&rungs[0], &rungs[1], &rungs[2]], &text, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pairs = read_csv(&out.join("pairs.csv"));
    assert_eq!(pairs.len(), 3, "three pairs of three models");
    let get = |a: &str, b: &str| pairs.iter().find(|r| r["label_a"] == a && r["label_b"] == b).unwrap_or_else(|| panic!("pair {a} {b}"));
    let (q8, q2) = (get("f32", "q8_0"), get("f32", "q2_k"));
    let (rho8, rho2) = (num(q8, "mean_received_spearman"), num(q2, "mean_received_spearman"));
    assert!(rho8 > rho2, "q8_0 rho {rho8} should exceed q2_k rho {rho2}");
    assert!(rho8 > 0.99 && rho8 < 1.0, "q8_0 is close to, not equal to, f32: {rho8}");
    // Perplexity orders the same way.
    let models = read_csv(&out.join("models.csv"));
    let ppl: Vec<f64> = models.iter().map(|r| num(r, "perplexity")).collect();
    assert!((ppl[1] - ppl[0]).abs() < (ppl[2] - ppl[0]).abs(), "perplexities {ppl:?}");
    // The per-layer rho of f32 vs q2_k equals the mean over documents of Spearman's rho of
    // the two models' captured received attention, computed here.
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("meta.json")).unwrap()).unwrap();
    let docs: Vec<Vec<i32>> = meta["documents"].as_array().unwrap().iter().map(|d| d["token_ids"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect()).collect();
    let (ra, rb) = (received(&rungs[0], &docs), received(&rungs[2], &docs));
    let rows = read_csv(&out.join("pairs_layers.csv"));
    for l in 0..3 {
        let want: f64 = docs
            .iter()
            .enumerate()
            .map(|(k, _)| {
                let a: Vec<f32> = ra[k][l].iter().map(|&x| x as f32).collect();
                let b: Vec<f32> = rb[k][l].iter().map(|&x| x as f32).collect();
                spearman(&a, &b)
            })
            .sum::<f64>()
            / docs.len() as f64;
        let row = rows.iter().find(|r| r["label_a"] == "f32" && r["label_b"] == "q2_k" && r["layer"] == l.to_string()).unwrap();
        let got = num(row, "received_spearman");
        assert!((got - want).abs() < 1e-5, "layer {l}: compare {got}, recomputed {want}");
    }
}

#[test]
fn models_with_another_vocabulary_or_shape_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (model, text) = setup(d.path());
    let out = d.path().join("out");
    let smol = common::model_path(common::SMOL);
    let o = compare(&[&model, &smol], &text, &out, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("different vocabulary"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "{err}");
    assert!(!out.exists(), "no output for refused models");
    let two = d.path().join("two.gguf");
    TinyModel::new(TinyConfig { n_layer: 2, ..TinyConfig::default() }).write_gguf(&two).unwrap();
    let o = compare(&[&model, &two], &text, &out, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("same architecture"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());
    let o = compare(&[&model], &text, &out, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least two models"));
    let o = compare(&[&model, &d.path().join("missing.gguf")], &text, &out, &[]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing.gguf"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());
    let o = compare(&[&model, &model], &text, &out, &["--policies", "lru"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown policy lru"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.exists());
    let o = compare(&[&model, &model], &text, &out, &["--ratio", "1.5"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ratio"));
    assert!(!out.exists());
}

/// Run `script` in a private mount namespace (so a tmpfs can be mounted without touching
/// the machine); `None` when this machine cannot make one.
fn in_namespace(script: &str) -> Option<std::process::Output> {
    let probe = std::process::Command::new("unshare").args(["-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"]).output().ok()?;
    if !probe.status.success() {
        return None;
    }
    std::process::Command::new("unshare").args(["-Urm", "sh", "-c", script]).output().ok()
}

fn quote(p: &Path) -> String {
    format!("'{}'", p.display())
}

#[test]
fn a_full_disk_or_read_only_output_leaves_no_files() {
    let d = tempfile::tempdir().unwrap();
    let (model, text) = setup(d.path());
    let mnt = d.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let exe = env!("CARGO_BIN_EXE_attractors");
    let args = format!("compare --model {m} --model {m} --corpus {t} --max-tokens 96 --docs 3 --min-tokens 16 --threads 2 --policies {POLICIES}", m = quote(&model), t = quote(&text));
    // 64 KiB: the probe file fits, the figures do not.
    let full = format!(
        "mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99; '{exe}' {args} --out {mnt}/out 2>{err}; rc=$?; ls -A {mnt} > {ls} 2>&1; exit $rc",
        mnt = quote(&mnt),
        err = quote(&d.path().join("err1")),
        ls = quote(&d.path().join("ls1"))
    );
    let Some(o) = in_namespace(&full) else {
        panic!("this machine cannot make a mount namespace (unshare -Urm): the full-disk test needs one");
    };
    let err = std::fs::read_to_string(d.path().join("err1")).unwrap_or_default();
    assert_ne!(o.status.code(), Some(99), "tmpfs mount failed");
    assert!(!o.status.success(), "a 64 KiB disk cannot hold the outputs: {err}");
    assert!(err.contains("No space left") || err.contains("os error 28"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "{err}");
    let ls = std::fs::read_to_string(d.path().join("ls1")).unwrap();
    assert_eq!(ls.lines().collect::<Vec<_>>(), Vec::<&str>::new(), "no file and no folder left on the full disk: {ls}");

    let ro = format!(
        "mount -t tmpfs -o ro,size=1m tmpfs {mnt} || exit 99; '{exe}' {args} --out {mnt}/out 2>{err}; rc=$?; ls -A {mnt} > {ls} 2>&1; exit $rc",
        mnt = quote(&mnt),
        err = quote(&d.path().join("err2")),
        ls = quote(&d.path().join("ls2"))
    );
    let o = in_namespace(&ro).unwrap();
    let err = std::fs::read_to_string(d.path().join("err2")).unwrap_or_default();
    assert!(!o.status.success());
    assert!(err.contains("cannot write to output directory") && err.contains("writable --out"), "{err}");
    assert!(std::fs::read_to_string(d.path().join("ls2")).unwrap().trim().is_empty());

    // The quantizer on a full disk: an error that names the space, no temporary file left.
    let q = format!(
        "mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99; '{exe}' quantize --model {m} --types q8_0 --out {mnt}/ladder 2>{err}; rc=$?; ls -A {mnt}/ladder > {ls} 2>/dev/null; exit $rc",
        mnt = quote(&mnt),
        m = quote(&model),
        err = quote(&d.path().join("err3")),
        ls = quote(&d.path().join("ls3"))
    );
    let o = in_namespace(&q).unwrap();
    let err = std::fs::read_to_string(d.path().join("err3")).unwrap_or_default();
    assert!(!o.status.success(), "the q8_0 rung does not fit in 64 KiB: {err}");
    assert!(err.contains("free space"), "{err}");
    assert!(std::fs::read_to_string(d.path().join("ls3")).unwrap().trim().is_empty(), "a partial rung was left");
}
