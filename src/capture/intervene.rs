//! Activation interventions written from the eval callback (App. A.3): set one dimension
//! per layer of an activation node to zero or to random values, before later nodes read it.

use crate::ffi::{EvalHook, HookError, NodeInfo, TensorView};

use super::split_node_name;

/// What to write into the chosen dimension.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Edit {
    Zero,
    /// Gaussian values with this mean and standard deviation (per layer).
    Random,
}

/// Per layer: the dimension to edit and, for `Random`, its mean and std.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerEdit {
    pub layer: usize,
    pub dim: usize,
    pub mean: f64,
    pub std: f64,
}

pub struct EditHook {
    node: String,
    edit: Edit,
    by_layer: Vec<Option<LayerEdit>>,
    rng: u64,
    /// Values written so far (for tests and the report).
    pub written: u64,
}

impl EditHook {
    pub fn new(node: &str, edit: Edit, edits: &[LayerEdit], n_layer: usize, seed: u64) -> EditHook {
        let mut by_layer = vec![None; n_layer];
        for e in edits {
            if e.layer < n_layer {
                by_layer[e.layer] = Some(e.clone());
            }
        }
        EditHook { node: node.to_string(), edit, by_layer, rng: seed ^ 0x5DEE_CE66_D1CE_4E5B, written: 0 }
    }

    fn next_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Standard normal (Box-Muller).
    fn gauss(&mut self) -> f64 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

impl EvalHook for EditHook {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        node.computed
            && !matches!(node.op, "VIEW" | "RESHAPE" | "PERMUTE" | "TRANSPOSE")
            && split_node_name(node.name).is_some_and(|(p, l)| p == self.node && self.by_layer.get(l).is_some_and(|e| e.is_some()))
    }

    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let Some((_, layer)) = split_node_name(t.name()) else { return Ok(()) };
        let Some(e) = self.by_layer.get(layer).cloned().flatten() else { return Ok(()) };
        let [width, rows, w2, w3] = t.ne();
        if w2 != 1 || w3 != 1 || t.nb()[1] != width * 4 {
            return Err(HookError(format!("cannot edit {}: expected a contiguous [width, tokens] f32 tensor, got {:?}", t.name(), t.ne())));
        }
        if e.dim >= width {
            return Err(HookError(format!("dimension {} is out of range for {} (width {width})", e.dim, t.name())));
        }
        let data = t.f32_data_mut().ok_or_else(|| HookError(format!("{} is not writable f32 host memory (GPU intervention is not supported yet)", t.name())))?;
        for r in 0..rows {
            let v = match self.edit {
                Edit::Zero => 0.0,
                Edit::Random => (e.mean + e.std * self.gauss()) as f32,
            };
            data[r * width + e.dim] = v;
            self.written += 1;
        }
        Ok(())
    }
}
