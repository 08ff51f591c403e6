//! The `activation` policy's calibration (Sec. 4.2): per layer, the activation dimension
//! whose value correlates most with received attention, and the sign of that correlation.
//! File format (CSV with `#` header lines naming the vocabulary, corpus and node):
//! ```text
//! # attractors activation calibration
//! # vocab: <fingerprint> (...)
//! # corpus: <files> (<tokens> tokens)
//! # node: attn_norm
//! layer,dim,rho,p,n
//! ```
//! A layer without a significant dimension has an empty `dim` (the policy keeps all there).

#[derive(Debug, Clone, PartialEq)]
pub struct LayerDim {
    pub dim: usize,
    pub rho: f64,
    pub p: f64,
    pub n: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    pub vocab: String,
    pub corpus: String,
    pub node: String,
    pub layers: Vec<Option<LayerDim>>,
}

impl Calibration {
    pub fn to_csv(&self) -> String {
        let mut s = format!("# attractors activation calibration\n# vocab: {}\n# corpus: {}\n# node: {}\nlayer,dim,rho,p,n\n", self.vocab, self.corpus, self.node);
        for (l, d) in self.layers.iter().enumerate() {
            match d {
                Some(d) => s.push_str(&format!("{l},{},{:.6},{:.3e},{}\n", d.dim, d.rho, d.p, d.n)),
                None => s.push_str(&format!("{l},,,,\n")),
            }
        }
        s
    }

    pub fn parse(s: &str) -> Result<Calibration, String> {
        let (mut vocab, mut corpus, mut node) = (None, String::new(), None);
        let mut layers = vec![];
        for line in s.lines() {
            if let Some(v) = line.strip_prefix("# vocab: ") {
                vocab = Some(v.to_string());
            } else if let Some(c) = line.strip_prefix("# corpus: ") {
                corpus = c.to_string();
            } else if let Some(n) = line.strip_prefix("# node: ") {
                node = Some(n.to_string());
            } else if line.starts_with('#') || line.starts_with("layer,") || line.is_empty() {
                continue;
            } else {
                let f: Vec<&str> = line.split(',').collect();
                let bad = || format!("bad calibration line {line:?}");
                if f.len() != 5 || f[0].parse::<usize>().ok() != Some(layers.len()) {
                    return Err(bad());
                }
                layers.push(if f[1].is_empty() {
                    None
                } else {
                    Some(LayerDim {
                        dim: f[1].parse().map_err(|_| bad())?,
                        rho: f[2].parse().map_err(|_| bad())?,
                        p: f[3].parse().map_err(|_| bad())?,
                        n: f[4].parse().map_err(|_| bad())?,
                    })
                });
            }
        }
        let vocab = vocab.ok_or("not a calibration file (no '# vocab:' line): make one with `attractors calibrate`")?;
        let node = node.ok_or("calibration file has no '# node:' line")?;
        Ok(Calibration { vocab, corpus, node, layers })
    }

    pub fn fingerprint(&self) -> &str {
        self.vocab.split_whitespace().next().unwrap_or("")
    }

    /// The distinct calibrated dimensions (what the capture keeps).
    pub fn dims(&self) -> Vec<usize> {
        let mut d: Vec<usize> = self.layers.iter().flatten().map(|l| l.dim).collect();
        d.sort_unstable();
        d.dedup();
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_round_trips() {
        let c = Calibration {
            vocab: "abc (10 tokens, m)".into(),
            corpus: "x.txt (9 tokens)".into(),
            node: "attn_norm".into(),
            layers: vec![None, Some(LayerDim { dim: 7, rho: -0.25, p: 1e-4, n: 2044 }), Some(LayerDim { dim: 3, rho: 0.5, p: 0.0, n: 2044 })],
        };
        let back = Calibration::parse(&c.to_csv()).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.dims(), vec![3, 7]);
        assert!(Calibration::parse("layer,dim\n0,1,2,3,4\n").is_err());
        assert!(Calibration::parse("# vocab: a\n# node: n\n1,1,0.1,0.1,5\n").is_err(), "layers must start at 0");
    }
}
