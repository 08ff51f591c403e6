//! Activation interventions written from the eval callback (App. A.3): set one dimension
//! per layer of an activation node to zero or to random values, before later nodes read it.

use crate::ffi::{EvalHook, HookError, NodeInfo, TensorView};
use crate::rng::SplitMix64;

use super::profile::NodeRef;

/// What to write into the chosen dimension.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Edit {
    /// Set the dimension to 0.
    Zero,
    /// Gaussian values with this mean and standard deviation (per layer).
    Random,
}

/// Per layer: the dimension to edit and, for `Random`, its mean and std.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerEdit {
    /// Layer.
    pub layer: usize,
    /// Dimension.
    pub dim: usize,
    /// Its mean over the text.
    pub mean: f64,
    /// Its standard deviation over the text.
    pub std: f64,
}

/// A graph hook that edits one dimension of an activation node per layer as it is computed.
pub struct EditHook {
    /// Per layer: the node edited there (see [`super::profile::ModelProfile::resolve`]).
    nodes: Vec<Option<NodeRef>>,
    edit: Edit,
    by_layer: Vec<Option<LayerEdit>>,
    rng: SplitMix64,
    /// Values written so far (for tests and the report).
    pub written: u64,
    scratch: Vec<f32>,
}

impl EditHook {
    /// `nodes[l]`: the node of layer `l` to edit (the activation role resolved on the model).
    pub fn new(nodes: Vec<Option<NodeRef>>, edit: Edit, edits: &[LayerEdit], n_layer: usize, seed: u64) -> EditHook {
        let mut by_layer = vec![None; n_layer];
        for e in edits {
            if e.layer < n_layer {
                by_layer[e.layer] = Some(e.clone());
            }
        }
        EditHook { nodes, edit, by_layer, rng: SplitMix64(seed ^ 0x5DEE_CE66_D1CE_4E5B), written: 0, scratch: vec![] }
    }
}

impl EditHook {
    /// The layer whose edited node this is (a layer with an edit).
    fn layer_of(&self, name: &str, op: &str) -> Option<usize> {
        self.nodes.iter().enumerate().position(|(l, n)| n.as_ref().is_some_and(|n| n.name == name && n.op == op) && self.by_layer.get(l).is_some_and(|e| e.is_some()))
    }
}

impl EvalHook for EditHook {
    fn wants(&mut self, node: &NodeInfo) -> bool {
        node.computed && self.layer_of(node.name, node.op).is_some()
    }

    fn observe(&mut self, t: &TensorView) -> Result<(), HookError> {
        let Some(layer) = self.layer_of(t.name(), t.op_name()) else { return Ok(()) };
        let Some(e) = self.by_layer.get(layer).cloned().flatten() else { return Ok(()) };
        let [width, rows, w2, w3] = t.ne();
        if w2 != 1 || w3 != 1 || t.nb()[1] != width * 4 {
            return Err(HookError(format!("cannot edit {}: expected a contiguous [width, tokens] f32 tensor, got {:?}", t.name(), t.ne())));
        }
        if e.dim >= width {
            return Err(HookError(format!("dimension {} is out of range for {} (width {width})", e.dim, t.name())));
        }
        // In place in host memory; on a GPU the [width, tokens] activation is copied out and back.
        let (edit, rng, written) = (self.edit, &mut self.rng, &mut self.written);
        t.edit_f32(&mut self.scratch, |data| {
            for r in 0..rows {
                data[r * width + e.dim] = match edit {
                    Edit::Zero => 0.0,
                    Edit::Random => (e.mean + e.std * rng.gauss()) as f32,
                };
                *written += 1;
            }
        })
        .map_err(|err| HookError(err.to_string()))?;
        Ok(())
    }
}
