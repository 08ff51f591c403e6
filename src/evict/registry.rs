//! Policies by name. The built-ins register here like any policy a user writes: a name and
//! a factory that builds the policy from its spec (`NAME[:KEY=VALUE...]`). Every pipeline
//! (`prune`, the bounded stream, the evaluations, `compare`) builds its policies through
//! [`build()`](crate::evict::registry::build), so a registered policy runs wherever a built-in does.
//!
//! ```
//! use attractors::evict::{registry, Needs, Observation, Policy, PolicyError, Scores};
//!
//! /// Keep the first token of every run of equal tokens (a toy rule).
//! struct RunStarts;
//! impl Policy for RunStarts {
//!     fn name(&self) -> &'static str { "run-starts" }
//!     fn needs(&self) -> Needs { Needs::default() }
//!     fn streaming(&self) -> bool { true }
//!     fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
//!         Ok(Scores::Shared((0..obs.n).map(|j| (j == 0 || obs.tokens[j] != obs.tokens[j - 1]) as u8 as f64).collect()))
//!     }
//! }
//! registry::register("run-starts", |spec| {
//!     spec.no_params()?;
//!     Ok(Box::new(RunStarts))
//! }).unwrap();
//! assert_eq!(attractors::evict::by_name("run-starts", &[]).unwrap().name(), "run-starts");
//! ```
#![warn(missing_docs)]

use std::sync::{Arc, LazyLock, RwLock};

use super::{activation, frequency, full, h2o, l2norm, random, sirllm, snapkv, streaming, tova, Policy};

/// A parsed policy spec, handed to a factory.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// The whole spec as written (`sirllm:recent=0.5`).
    pub spec: &'a str,
    /// The policy name (`sirllm`).
    pub name: &'a str,
    /// `KEY=VALUE` parameters in order.
    pub params: Vec<(&'a str, &'a str)>,
    /// The frequency list of the model (token ids), for policies that keep frequent tokens.
    pub frequent: &'a [i32],
}

impl Spec<'_> {
    /// Refuse any parameter.
    pub fn no_params(&self) -> Result<(), String> {
        if self.params.is_empty() {
            Ok(())
        } else {
            Err(format!("policy {n} takes no parameters: write {n}", n = self.name))
        }
    }

    /// Parameter `k=v` as a number in `[lo, hi]`.
    pub fn num(&self, k: &str, v: &str, lo: f64, hi: f64) -> Result<f64, String> {
        v.parse::<f64>().ok().filter(|x| (lo..=hi).contains(x)).ok_or_else(|| format!("policy parameter {k}={v} in {}: give a number from {lo} to {hi}", self.spec))
    }

    /// The error for a parameter the policy does not have; `known` lists those it has.
    pub fn unknown(&self, k: &str, known: &str) -> String {
        format!("policy {} has no parameter {k}: use {known}", self.name)
    }

    /// `recent=SHARE` (and `decay=D` when the policy has one), each in [0, 1].
    fn shares(&self, recent: &mut f64, mut decay: Option<&mut f64>) -> Result<(), String> {
        for &(k, v) in &self.params {
            match (k, decay.as_deref_mut()) {
                ("recent", _) => *recent = self.num(k, v, 0.0, 1.0)?,
                ("decay", Some(d)) => *d = self.num(k, v, 0.0, 1.0)?,
                _ => return Err(self.unknown(k, if decay.is_some() { "recent, decay" } else { "recent" })),
            }
        }
        Ok(())
    }
}

/// Builds a policy from its spec.
pub type Factory = Arc<dyn Fn(&Spec) -> Result<Box<dyn Policy>, String> + Send + Sync>;

static REGISTRY: LazyLock<RwLock<Vec<(String, Factory)>>> = LazyLock::new(|| RwLock::new(builtins()));

fn entry(name: &str, f: impl Fn(&Spec) -> Result<Box<dyn Policy>, String> + Send + Sync + 'static) -> (String, Factory) {
    (name.to_string(), Arc::new(f))
}

fn builtins() -> Vec<(String, Factory)> {
    vec![
        entry("full", |s| s.no_params().map(|_| Box::new(full::Full) as Box<dyn Policy>)),
        entry("frequency", |s| {
            let mut p = frequency::Frequency::new(s.frequent);
            s.shares(&mut p.recent_share, Some(&mut p.decay))?;
            Ok(Box::new(p))
        }),
        entry("l2norm", |s| s.no_params().map(|_| Box::new(l2norm::L2Norm::default()) as Box<dyn Policy>)),
        entry("activation", |s| s.no_params().map(|_| Box::new(activation::Activation::default()) as Box<dyn Policy>)),
        entry("h2o", |s| {
            let mut p = h2o::H2o::default();
            s.shares(&mut p.recent_share, None)?;
            Ok(Box::new(p))
        }),
        entry("tova", |s| s.no_params().map(|_| Box::new(tova::Tova) as Box<dyn Policy>)),
        entry("snapkv", |s| {
            let mut p = snapkv::SnapKv::default();
            for &(k, v) in &s.params {
                match k {
                    "pool" => {
                        p.pool = match v {
                            "avg" => snapkv::Pool::Avg,
                            "max" => snapkv::Pool::Max,
                            _ => return Err(format!("policy parameter pool={v} in {}: use avg or max", s.spec)),
                        }
                    }
                    "kernel" => p.kernel = s.num(k, v, 1.0, 63.0)? as usize,
                    "window" => p.window = s.num(k, v, 0.0, 1e6)? as usize,
                    _ => return Err(s.unknown(k, "pool, kernel, window")),
                }
            }
            Ok(Box::new(p))
        }),
        entry("streaming", |s| s.no_params().map(|_| Box::new(streaming::Streaming) as Box<dyn Policy>)),
        entry("sirllm", |s| {
            let mut p = sirllm::SirLlm::default();
            s.shares(&mut p.recent_share, Some(&mut p.decay))?;
            Ok(Box::new(p))
        }),
        entry("random", |s| s.no_params().map(|_| Box::new(random::Random) as Box<dyn Policy>)),
    ]
}

/// Register a policy under `name` (letters, digits, `-` and `_`); a later registration of
/// the same name replaces an earlier user one. Built-in names cannot be taken.
pub fn register(name: &str, factory: impl Fn(&Spec) -> Result<Box<dyn Policy>, String> + Send + Sync + 'static) -> Result<(), String> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("policy name `{name}` must be letters, digits, - or _"));
    }
    if super::POLICIES.contains(&name) {
        return Err(format!("policy name {name} is a built-in: choose another name"));
    }
    let mut r = REGISTRY.write().unwrap_or_else(|e| e.into_inner());
    r.retain(|(n, _)| n != name);
    r.push(entry(name, factory));
    Ok(())
}

/// Every registered policy name: the built-ins in the order of methods.md, then the user's.
pub fn names() -> Vec<String> {
    REGISTRY.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(n, _)| n.clone()).collect()
}

/// Build the policy `spec` names (`NAME[:KEY=VALUE...]`).
pub fn build(spec: &str, frequent: &[i32]) -> Result<Box<dyn Policy>, String> {
    let mut parts = spec.split(':');
    let name = parts.next().unwrap_or("");
    let mut params = vec![];
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("policy parameter `{p}` in {spec} is not KEY=VALUE: write e.g. sirllm:recent=0.5"))?;
        params.push((k, v));
    }
    let factory = REGISTRY.read().unwrap_or_else(|e| e.into_inner()).iter().find(|(n, _)| n == name).map(|(_, f)| f.clone());
    let factory = factory.ok_or_else(|| format!("unknown policy {name}: use one of {}", names().join(", ")))?;
    factory(&Spec { spec, name, params, frequent })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evict::{Needs, Observation, PolicyError, Scores};

    struct Ones;
    impl Policy for Ones {
        fn name(&self) -> &'static str {
            "ones-test"
        }
        fn needs(&self) -> Needs {
            Needs::default()
        }
        fn streaming(&self) -> bool {
            false
        }
        fn score(&self, obs: &Observation) -> Result<Scores, PolicyError> {
            Ok(Scores::Shared(vec![1.0; obs.n]))
        }
    }

    #[test]
    fn a_registered_policy_builds_by_name_and_built_ins_cannot_be_taken() {
        assert!(build("ones-test", &[]).err().unwrap().contains("unknown policy ones-test"));
        register("ones-test", |s| s.no_params().map(|_| Box::new(Ones) as Box<dyn Policy>)).unwrap();
        assert_eq!(build("ones-test", &[]).unwrap().name(), "ones-test");
        assert!(names().iter().any(|n| n == "ones-test"));
        assert!(build("ones-test:x=1", &[]).err().unwrap().contains("takes no parameters"));
        assert!(register("h2o", |_| Err("no".into())).err().unwrap().contains("built-in"));
        assert!(register("bad:name", |_| Err("no".into())).is_err());
        // the built-ins still parse their parameters
        assert!(build("sirllm:recent=2", &[]).err().unwrap().contains("from 0 to 1"));
        assert!(build("snapkv:pool=min", &[]).err().unwrap().contains("avg or max"));
    }
}
