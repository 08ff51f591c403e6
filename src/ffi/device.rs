//! Work on the device that holds a tensor: small ggml graphs computed on that tensor's own
//! backend (CUDA, Vulkan, Metal, or the CPU: whatever owns the buffer), so that only summaries
//! cross to the host. Every node is checked with `ggml_backend_supports_op` before it runs.
//!
//! The eval callback hands us `kq_soft_max-<l>` (`[n_kv, n_tok, n_head]`, contiguous f32).
//! On a GPU, copying it to the host costs `n_kv * n_tok * n_head * 4` bytes per layer and
//! micro-batch; [`DeviceCompute::reduce_attention`] instead aliases the tensor's memory in a
//! graph of reductions and copies back only the column sums, the diagonal, per-query distance
//! sums and flow rows. [`DeviceCompute::reduce_activation`] does the same for activation
//! nodes (`[width, tokens]`): per-row norms, top-3 and median |x|, chosen dims, head norms.
//! Each graph's inputs and outputs are packed into one device buffer, so a graph costs one
//! upload and one download.
//!
//! The graphs use only ops that every backend computes in f32: element-wise ops, copies,
//! views, `pad`, `get_rows`, `sum_rows` and `argsort`. Never `mul_mat` or `out_prod`: CUDA runs those
//! through cuBLAS in TF32 (ggml sets `CUBLAS_TF32_TENSOR_OP_MATH`) or its own TF32 tensor-core
//! kernels, and Vulkan rounds their inputs to f16 on devices with f16 arithmetic; either costs
//! about 1e-3 of relative precision (found on Mesa's llvmpipe Vulkan device, where distance
//! sums came back rounded to f16). Metal has no `out_prod` at all.
//! [`DeviceCompute::hide`] writes `-inf` into `kq-<l>` with an in-place add of
//! `log(keep)` built on the device from per-cell inputs, without copying the tensor.
//!
//! The same graphs run on the CPU backend when asked to (`--attn-reduce device`), which is
//! how the tests check them against the host reduction and the reference model.

use std::ffi::CStr;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

use super::tensor::TensorView;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("tensor {0} has no backend buffer")]
    NoBuffer(String),
    #[error("no ggml device owns the buffer of tensor {0}")]
    NoDevice(String),
    #[error("ggml could not start a backend on device {0}")]
    Init(String),
    #[error("device {dev} cannot run ggml op {op}: reductions fall back to copying to the host")]
    Unsupported { dev: String, op: String },
    #[error("tensor {name} is not contiguous f32 (type {ty}): it cannot be reduced on the device")]
    Layout { name: String, ty: String },
    #[error("ggml could not allocate {0} bytes on device {1}")]
    Alloc(usize, String),
    #[error("graph compute failed on device {0}")]
    Compute(String),
    #[error("reduction inputs do not match the tensor: {0}")]
    Plan(String),
}

/// What one device reduction of attention computes, besides the column sums.
pub struct AttnPlan<'a> {
    /// Ranges of query rows `i0..i1` (of this micro-batch): output column `w` is
    /// `sum_{i in ranges[w]} A[c, i, h]` for every cell `c` and head `h` (zero when empty).
    pub ranges: &'a [(usize, usize)],
    /// Flat element indices `c + n_kv * (i + n_tok * h)` to gather (the diagonal: each query's
    /// own cell), in the order `h * n_tok + i`.
    pub gather: &'a [i32],
    pub distance: Option<DistPlan<'a>>,
    pub flow: Option<FlowPlan<'a>>,
}

/// Head-mean attention summed per query and distance bucket. Requires consecutive query
/// positions `q0 + i`.
pub struct DistPlan<'a> {
    /// For `k` in `0..P`: the cell holding position `p_hi - k`, or `n_kv` when none does
    /// (`p_hi` the last query's position, `P` the span of positions down to the first cached).
    pub cells_desc: &'a [i32],
    /// `p_hi - q0`.
    pub offset: usize,
    pub n_buckets: usize,
    /// Bucket of a distance (`>= n_buckets`: not counted).
    pub bucket: &'a dyn Fn(usize) -> usize,
}

/// Gradient-free flow: `F[c, i] = sum_h A[c, i, h] * scale[h][c]`; row sums per query and
/// the rows of queries `pred_from..n_tok`.
pub struct FlowPlan<'a> {
    /// `[h * n_kv + c]`.
    pub scale: &'a [f32],
    pub pred_from: usize,
}

/// Results copied back from the device.
#[derive(Debug, Default, Clone)]
pub struct AttnOut {
    /// `[w + ranges.len() * (c + n_kv * h)]`.
    pub cols: Vec<f32>,
    /// In the order of `AttnPlan::gather`.
    pub gathered: Vec<f32>,
    /// `[b + n_buckets * i]`.
    pub distance: Vec<f32>,
    /// `[i]`, self included.
    pub flow_rows: Vec<f32>,
    /// `[c + n_kv * (i - pred_from)]`.
    pub flow_pred: Vec<f32>,
}

/// One activation node's rows: `n_rows` rows of `width` floats, `row_stride` floats apart.
pub struct ActPlan<'a> {
    pub width: usize,
    pub n_rows: usize,
    pub row_stride: usize,
    /// Dimensions whose values come back.
    pub dims: &'a [usize],
    /// Per-head sums of squares over this many equal blocks of each row (0: none).
    pub n_heads: usize,
}

/// Per row `i` of an activation, from the device.
#[derive(Debug, Default, Clone)]
pub struct ActOut {
    /// `[i]`: sum of squares.
    pub sumsq: Vec<f32>,
    /// `[k_top * i + k]`: the `k`-th largest |x| and its dimension (ties in any order).
    pub top_abs: Vec<f32>,
    pub top_dim: Vec<i32>,
    /// `min(3, width)`.
    pub k_top: usize,
    /// `[i]`: the median |x|, computed as [`crate::capture::activation::median_in_place`] does.
    pub median_abs: Vec<f32>,
    /// `[i * dims.len() + k]`.
    pub values: Vec<f32>,
    /// `[i * n_heads + g]`: sums of squares per head.
    pub head_sumsq: Vec<f32>,
}

/// A micro-batch's attention mask against the cell mirror before it: entry `(c, k)` is
/// expected visible when `lo[k] <= cell_pos[c] <= q[k]` (the query's window and causality;
/// empty cells are -1). The caller decides from [`MaskOut`] whether the mask is the usual
/// pattern (each query's own cell new, seen by every later query).
pub struct MaskPlan<'a> {
    pub cell_pos: &'a [f32],
    pub lo: &'a [f32],
    pub q: &'a [f32],
}

/// Counts of mask entries the mirror does not explain.
#[derive(Debug, Default, Clone)]
pub struct MaskOut {
    /// Per query: cells it sees that the mirror does not expect.
    pub unexplained: Vec<f32>,
    /// Per query: cells the mirror expects it to see that the mask hides.
    pub hidden: Vec<f32>,
    /// Per cell: the queries that see it unexpectedly, and the sum of their indices.
    pub col_count: Vec<f32>,
    pub col_index_sum: Vec<f32>,
}

/// Which (cell, query, head group) entries of `kq` to hide: cell `c` of head group `g` is
/// hidden from query `i` when `hidden[g * n_kv + c] == 1` and `0 < q_i - p_c < window`.
pub struct HidePlan<'a> {
    pub cell_pos: &'a [f32],
    pub query_pos: &'a [f32],
    pub hidden: &'a [f32],
    pub n_groups: usize,
    pub window: f32,
}

/// A ggml backend on the device that owns a tensor's buffer, with a graph allocator that
/// keeps its device memory between calls.
pub struct DeviceCompute {
    dev: sys::ggml_backend_dev_t,
    backend: NonNull<sys::ggml_backend>,
    galloc: NonNull<sys::ggml_gallocr>,
    /// Allocators whose buffers were outgrown, kept until this object is dropped (see
    /// [`DeviceCompute::run`]).
    retired: Vec<NonNull<sys::ggml_gallocr>>,
    /// An allocator that only plans (it never holds a buffer): the size a graph needs.
    measure: NonNull<sys::ggml_gallocr>,
    name: String,
    /// A buffer of this device for each graph's inputs and outputs, packed so that each
    /// direction is one copy (see [`DeviceCompute::run`]); grows by doubling.
    io: Option<NonNull<sys::ggml_backend_buffer>>,
    /// Outgrown `io` buffers, kept until this object is dropped (as `retired`).
    io_retired: Vec<NonNull<sys::ggml_backend_buffer>>,
    /// Host staging for the packed inputs and outputs.
    stage_up: Vec<u8>,
    stage_down: Vec<u8>,
    /// Bytes copied device -> host and host -> device by this object.
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Copies made each way (one per graph that has inputs, one per graph that has outputs).
    pub copies_down: u64,
    pub copies_up: u64,
    /// Wall time spent running graphs (allocation, uploads, compute, downloads).
    pub seconds: f64,
}

// SAFETY: the backend and allocator are used only through `&mut self`, from one thread at a
// time (the thread running `llama_decode`); ggml backends are not tied to their creating thread.
unsafe impl Send for DeviceCompute {}

fn cstr(p: *const std::os::raw::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: ggml returns NUL-terminated static or device-owned strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// One graph's tensors: a no-alloc ggml context freed on drop.
struct GraphCtx(NonNull<sys::ggml_context>);

impl GraphCtx {
    fn new(n_tensors: usize) -> GraphCtx {
        // SAFETY: plain size queries.
        let size = unsafe { sys::ggml_tensor_overhead() * n_tensors + sys::ggml_graph_overhead() };
        let params = sys::ggml_init_params { mem_size: size, mem_buffer: std::ptr::null_mut(), no_alloc: true };
        // SAFETY: ggml allocates `size` bytes of metadata; a null return is checked below.
        let p = unsafe { sys::ggml_init(params) };
        GraphCtx(NonNull::new(p).expect("ggml_init failed to allocate tensor metadata"))
    }
    fn ptr(&self) -> *mut sys::ggml_context {
        self.0.as_ptr()
    }
}

impl Drop for GraphCtx {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init, freed once.
        unsafe { sys::ggml_free(self.0.as_ptr()) };
    }
}

/// Host data to upload into an input tensor after allocation.
enum Upload<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

impl DeviceCompute {
    /// A backend on the device whose buffer holds `t`.
    pub fn for_tensor(t: &TensorView) -> Result<DeviceCompute, DeviceError> {
        let raw = t.raw();
        // SAFETY: the tensor is live during the callback; its buffer (if any) is the scheduler's.
        let buf = unsafe { (*raw).buffer };
        if buf.is_null() {
            return Err(DeviceError::NoBuffer(t.name().into()));
        }
        // SAFETY: a live, non-null buffer.
        let dev = unsafe { device_of(buf) };
        if dev.is_null() {
            return Err(DeviceError::NoDevice(t.name().into()));
        }
        // SAFETY: `dev` is a registered device; the strings live as long as the registry.
        let name = unsafe { format!("{} ({})", cstr(sys::ggml_backend_dev_name(dev)), cstr(sys::ggml_backend_dev_description(dev))) };
        // SAFETY: valid device; null params select the defaults.
        let backend = NonNull::new(unsafe { sys::ggml_backend_dev_init(dev, std::ptr::null()) }).ok_or_else(|| DeviceError::Init(name.clone()))?;
        // SAFETY: valid backend; the allocators allocate from its default buffer type.
        let new_alloc = || NonNull::new(unsafe { sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(backend.as_ptr())) });
        let (galloc, measure) = match (new_alloc(), new_alloc()) {
            (Some(g), Some(m)) => (g, m),
            (g, m) => {
                // SAFETY: each was created above and is freed once, before the backend.
                unsafe {
                    for a in [g, m].into_iter().flatten() {
                        sys::ggml_gallocr_free(a.as_ptr());
                    }
                    sys::ggml_backend_free(backend.as_ptr());
                }
                return Err(DeviceError::Init(name));
            }
        };
        Ok(DeviceCompute {
            dev,
            backend,
            galloc,
            retired: vec![],
            measure,
            name,
            io: None,
            io_retired: vec![],
            stage_up: vec![],
            stage_down: vec![],
            bytes_down: 0,
            bytes_up: 0,
            copies_down: 0,
            copies_up: 0,
            seconds: 0.0,
        })
    }

    /// Whether `t` lives on this object's device.
    pub fn owns(&self, t: &TensorView) -> bool {
        // SAFETY: live tensor; its buffer is checked for null.
        unsafe {
            let buf = (*t.raw()).buffer;
            !buf.is_null() && device_of(buf) == self.dev
        }
    }

    /// `name (description)` of the device.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replace the live allocator by one whose buffer holds `bytes`, keeping the old one.
    fn grow(&mut self, bytes: usize) -> Result<(), DeviceError> {
        // SAFETY: valid backend; a null result is checked.
        let fresh = NonNull::new(unsafe { sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(self.backend.as_ptr())) }).ok_or_else(|| DeviceError::Alloc(bytes, self.name.clone()))?;
        let ctx = GraphCtx::new(1);
        // SAFETY: one input tensor of `bytes` bytes in `ctx` and a graph holding it; reserving
        // sizes the new allocator's buffer for it (later graphs are planned inside it).
        let ok = unsafe {
            let t = sys::ggml_new_tensor_1d(ctx.ptr(), sys::GGML_TYPE_I8, bytes as i64);
            sys::ggml_set_input(t);
            let g = sys::ggml_new_graph(ctx.ptr());
            sys::ggml_build_forward_expand(g, t);
            sys::ggml_gallocr_reserve(fresh.as_ptr(), g)
        };
        if !ok {
            // SAFETY: created above, freed once.
            unsafe { sys::ggml_gallocr_free(fresh.as_ptr()) };
            return Err(DeviceError::Alloc(bytes, self.name.clone()));
        }
        let old = std::mem::replace(&mut self.galloc, fresh);
        // SAFETY: valid allocator.
        if unsafe { sys::ggml_gallocr_get_buffer_size(old.as_ptr(), 0) } == 0 {
            // SAFETY: never held a buffer, so nothing on the device refers to it; freed once.
            unsafe { sys::ggml_gallocr_free(old.as_ptr()) };
        } else {
            self.retired.push(old);
        }
        Ok(())
    }

    /// A buffer of at least `bytes` for inputs and outputs: the live one, or a new one with
    /// twice the room (the outgrown one kept until drop, as for the graph allocators).
    fn io_buffer(&mut self, bytes: usize) -> Result<sys::ggml_backend_buffer_t, DeviceError> {
        if let Some(b) = self.io {
            // SAFETY: a live buffer of this object.
            if unsafe { sys::ggml_backend_buffer_get_size(b.as_ptr()) } >= bytes {
                return Ok(b.as_ptr());
            }
        }
        let want = (2 * bytes).max(1 << 16);
        // SAFETY: valid backend; a null result is checked.
        let fresh = NonNull::new(unsafe { sys::ggml_backend_buft_alloc_buffer(sys::ggml_backend_get_default_buffer_type(self.backend.as_ptr()), want) }).ok_or_else(|| DeviceError::Alloc(want, self.name.clone()))?;
        if let Some(old) = self.io.replace(fresh) {
            self.io_retired.push(old);
        }
        Ok(fresh.as_ptr())
    }

    /// Check every node, place the inputs and outputs in the io buffer, allocate the rest,
    /// upload the inputs, compute, and download `outputs`. Inputs are packed into one region
    /// and outputs into the next, so each direction is a single copy whatever the number of
    /// tensors (a GPU pays a fixed latency per copy, more than a small kernel costs). The
    /// graph's tensors live in `_ctx`, which the borrow keeps alive for the call.
    fn run(&mut self, _ctx: &GraphCtx, graph: *mut sys::ggml_cgraph, inputs: &[(*mut sys::ggml_tensor, Upload)], outputs: &mut [(*mut sys::ggml_tensor, &mut Vec<f32>)]) -> Result<(), DeviceError> {
        let t0 = std::time::Instant::now();
        let backend = self.backend.as_ptr();
        // SAFETY: `graph` and its nodes belong to `ctx`, alive for this call.
        unsafe {
            for i in 0..sys::ggml_graph_n_nodes(graph) {
                let node = sys::ggml_graph_node(graph, i);
                if !sys::ggml_backend_supports_op(backend, node) {
                    return Err(DeviceError::Unsupported { dev: self.name.clone(), op: cstr(sys::ggml_op_desc(node)) });
                }
                // Every view a node reads stays inside the tensor it views: a GPU does not
                // check, and reading past a buffer there is silent garbage or a crash.
                for src in (*node).src.iter().copied().filter(|s| !s.is_null()) {
                    let base = (*src).view_src;
                    if !base.is_null() && (*src).view_offs + sys::ggml_nbytes(src) > sys::ggml_nbytes(base) {
                        return Err(DeviceError::Plan(format!("a view of {} bytes at {} reads past its {}-byte tensor", sys::ggml_nbytes(src), (*src).view_offs, sys::ggml_nbytes(base))));
                    }
                }
            }
        }
        // Offsets in the io buffer: inputs from 0, outputs from `in_end`, each aligned.
        // SAFETY: valid backend; size queries on live tensors of `ctx`.
        let (buft, align) = unsafe {
            let buft = sys::ggml_backend_get_default_buffer_type(backend);
            (buft, sys::ggml_backend_buft_get_alignment(buft).max(1))
        };
        let place = |end: &mut usize, t: *mut sys::ggml_tensor| {
            let off = *end;
            // SAFETY: a live tensor of `ctx`.
            *end += unsafe { sys::ggml_backend_buft_get_alloc_size(buft, t) }.div_ceil(align) * align;
            off
        };
        let mut end = 0usize;
        let in_offs: Vec<usize> = inputs.iter().map(|(t, _)| place(&mut end, *t)).collect();
        let in_end = end;
        let out_offs: Vec<usize> = outputs.iter().map(|(t, _)| place(&mut end, *t)).collect();
        let total = end;
        let io = self.io_buffer(total)?;
        // SAFETY: `io` is live and at least `total` bytes; every tensor is placed inside it at
        // its own aligned offset, computed from its allocation size above. Tensors that already
        // have memory are left alone by the allocator below.
        unsafe {
            let base = sys::ggml_backend_buffer_get_base(io) as *mut u8;
            for (&t, &off) in inputs.iter().map(|(t, _)| t).chain(outputs.iter().map(|(t, _)| t)).zip(in_offs.iter().chain(&out_offs)) {
                if sys::ggml_backend_tensor_alloc(io, t, base.add(off) as *mut _) != sys::GGML_STATUS_SUCCESS {
                    return Err(DeviceError::Alloc(total, self.name.clone()));
                }
            }
        }
        // A graph larger than the allocator's buffer gets a new allocator with twice the room,
        // and the outgrown one is kept until this object is dropped. Letting ggml free it
        // while the backend lives crashed Mesa's llvmpipe Vulkan device (its threads later
        // read the destroyed buffer); doubling keeps what is kept below the live buffer's size
        // and the reallocations to a few per run.
        let mut need = 0usize;
        // SAFETY: plans the graph's memory on the allocator that never holds a buffer (planning
        // an outgrown allocator frees its buffer, so it must not be the live one); writes one
        // size per buffer (one).
        unsafe { sys::ggml_gallocr_reserve_n_size(self.measure.as_ptr(), graph, std::ptr::null(), std::ptr::null(), &mut need) };
        // SAFETY: valid allocator with one buffer.
        let have = unsafe { sys::ggml_gallocr_get_buffer_size(self.galloc.as_ptr(), 0) };
        if need > have {
            self.grow(2 * need)?;
        }
        // SAFETY: the allocator places every unallocated tensor of the graph in its buffer;
        // tensors aliasing the scheduler's memory or placed in `io` already have memory and
        // are left alone.
        if !unsafe { sys::ggml_gallocr_alloc_graph(self.galloc.as_ptr(), graph) } {
            return Err(DeviceError::Alloc(0, self.name.clone()));
        }
        // Two 1-d byte tensors spanning the packed inputs and outputs, for the two copies.
        let spans = GraphCtx::new(2);
        let span = |off: usize, len: usize| {
            // SAFETY: a tensor of `spans` placed in `io` over `off..off + len`, inside its
            // `total` bytes.
            unsafe {
                let t = sys::ggml_new_tensor_1d(spans.ptr(), sys::GGML_TYPE_I8, len as i64);
                let base = sys::ggml_backend_buffer_get_base(io) as *mut u8;
                if sys::ggml_backend_tensor_alloc(io, t, base.add(off) as *mut _) != sys::GGML_STATUS_SUCCESS {
                    return Err(DeviceError::Alloc(total, self.name.clone()));
                }
                Ok(t)
            }
        };
        if in_end > 0 {
            self.stage_up.clear();
            self.stage_up.resize(in_end, 0);
            for ((_, data), &off) in inputs.iter().zip(&in_offs) {
                let mut at = off;
                let mut put = |w: [u8; 4]| {
                    self.stage_up[at..at + 4].copy_from_slice(&w);
                    at += 4;
                };
                match data {
                    Upload::F32(d) => d.iter().for_each(|x| put(x.to_ne_bytes())),
                    Upload::I32(d) => d.iter().for_each(|x| put(x.to_ne_bytes())),
                }
            }
            let t = span(0, in_end)?;
            // SAFETY: `t` spans `in_end` bytes of `io`; the staging data outlives the
            // synchronize below.
            unsafe { sys::ggml_backend_tensor_set_async(backend, t, self.stage_up.as_ptr() as *const _, 0, in_end) };
            self.bytes_up += in_end as u64;
            self.copies_up += 1;
        }
        // SAFETY: graph allocated on this backend; compute waits for completion.
        let status = unsafe { sys::ggml_backend_graph_compute(backend, graph) };
        if status != sys::GGML_STATUS_SUCCESS {
            return Err(DeviceError::Compute(self.name.clone()));
        }
        if total > in_end {
            let t = span(in_end, total - in_end)?;
            self.stage_down.resize(total - in_end, 0);
            // SAFETY: `t` spans the outputs' `total - in_end` bytes of `io`, and the staging
            // buffer has that room until the synchronize below.
            unsafe {
                sys::ggml_backend_tensor_get_async(backend, t, self.stage_down.as_mut_ptr() as *mut _, 0, total - in_end);
                sys::ggml_backend_synchronize(backend);
            }
            self.bytes_down += (total - in_end) as u64;
            self.copies_down += 1;
            for ((t, out), &off) in outputs.iter_mut().zip(&out_offs) {
                // SAFETY: output tensors are contiguous f32 results of the computed graph.
                let n = unsafe { sys::ggml_nelements(*t) } as usize;
                let at = off - in_end;
                out.clear();
                out.extend(self.stage_down[at..at + 4 * n].chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])));
            }
        } else {
            // SAFETY: valid backend; waits for the upload and the graph.
            unsafe { sys::ggml_backend_synchronize(backend) };
        }
        self.seconds += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// Reduce one `kq_soft_max` tensor on its device (see [`AttnPlan`]).
    pub fn reduce_attention(&mut self, t: &TensorView, plan: &AttnPlan) -> Result<AttnOut, DeviceError> {
        let [n_kv, n_tok, n_head, _] = t.ne();
        check_contiguous(t)?;
        let n = n_kv * n_tok * n_head;
        if plan.ranges.is_empty() || plan.ranges.iter().any(|&(i0, i1)| i0 > i1 || i1 > n_tok) {
            return Err(DeviceError::Plan(format!("query ranges {:?} for {n_tok} rows", plan.ranges)));
        }
        if plan.gather.iter().any(|&g| g < 0 || g as usize >= n) || plan.gather.is_empty() {
            return Err(DeviceError::Plan("gather index out of the tensor".into()));
        }
        if let Some(f) = &plan.flow {
            if f.scale.len() != n_head * n_kv || f.pred_from > n_tok {
                return Err(DeviceError::Plan("flow scale does not match [n_head, n_kv]".into()));
            }
        }
        // Distance buckets as runs of distances `e0..e1` below the span `P`: a run of
        // one-distance buckets is copied as it is, a wider bucket is summed.
        let runs = match &plan.distance {
            Some(d) => {
                let p = d.cells_desc.len();
                if p == 0 || d.offset >= p || n_tok > p || d.cells_desc.iter().any(|&c| c < 0 || c as usize > n_kv) {
                    return Err(DeviceError::Plan("distance rows do not match the cells".into()));
                }
                bucket_runs(p, d.n_buckets, d.bucket)?
            }
            None => vec![],
        };
        let ctx = GraphCtx::new(64 + 4 * n_head + plan.ranges.len() * 2 + runs.len() * 2);
        let c = ctx.ptr();
        let (ne_kv, ne_tok, ne_head) = (n_kv as i64, n_tok as i64, n_head as i64);
        let mut inputs: Vec<(*mut sys::ggml_tensor, Upload)> = vec![];
        let mut cols: Vec<(usize, *mut sys::ggml_tensor)> = vec![];
        let (mut t_rows, mut t_pred) = (std::ptr::null_mut(), std::ptr::null_mut());
        // Distance sums per run: the tensor `[n_cols, n_tok]`, its first bucket and width.
        let mut t_dist: Vec<(*mut sys::ggml_tensor, usize, usize)> = vec![];
        let t_gath;
        // SAFETY: every tensor below is created in `ctx` from tensors of `ctx` (or the aliased
        // scheduler memory), with shapes and view extents checked above; nothing is computed
        // until `run`.
        let graph = unsafe {
            let input = |ty: sys::ggml_type, ne0: i64, ne1: i64| {
                let t = sys::ggml_new_tensor_2d(c, ty, ne0, ne1);
                sys::ggml_set_input(t);
                t
            };
            let out = |gf: *mut sys::ggml_cgraph, o: *mut sys::ggml_tensor| {
                sys::ggml_set_output(o);
                sys::ggml_build_forward_expand(gf, o);
            };
            // Sum of the `n_head` slices `[.., .., h]` of a contiguous 3-d tensor: a tree of
            // adds of half-stacks, about log2(n_head) kernels instead of n_head - 1 (a kernel
            // launch costs a GPU more than these adds do).
            let head_sum = |x: *mut sys::ggml_tensor| {
                let stack = |t: *mut sys::ggml_tensor, h0: usize, k: usize| sys::ggml_view_3d(c, t, (*t).ne[0], (*t).ne[1], k as i64, (*t).nb[1], (*t).nb[2], h0 * (*t).nb[2]);
                let (mut cur, mut k, mut odd) = (x, n_head, vec![]);
                while k > 1 {
                    let half = k / 2;
                    if k % 2 == 1 {
                        odd.push(stack(cur, half, 1));
                    }
                    cur = sys::ggml_add(c, stack(cur, 0, half), stack(cur, k - half, half));
                    k = half;
                }
                odd.into_iter().fold(cur, |acc, s| sys::ggml_add(c, acc, s))
            };
            let a = alias(c, t, n)?;
            let a3 = sys::ggml_reshape_3d(c, a, ne_kv, ne_tok, ne_head);
            let gf = sys::ggml_new_graph(c);
            // Queries as rows: [n_tok, n_kv, n_head]; column sums are row sums of its views.
            let at = sys::ggml_cont(c, sys::ggml_permute(c, a3, 1, 0, 2, 3));
            for (w, &(i0, i1)) in plan.ranges.iter().enumerate() {
                if i1 > i0 {
                    let v = sys::ggml_view_3d(c, at, (i1 - i0) as i64, ne_kv, ne_head, (*at).nb[1], (*at).nb[2], i0 * 4);
                    let s = sys::ggml_sum_rows(c, v);
                    out(gf, s);
                    cols.push((w, s));
                }
            }
            // The gathered elements (each query's own cell).
            let idx = input(sys::GGML_TYPE_I32, plan.gather.len() as i64, 1);
            inputs.push((idx, Upload::I32(plan.gather)));
            t_gath = sys::ggml_get_rows(c, sys::ggml_reshape_2d(c, a, 1, n as i64), sys::ggml_reshape_1d(c, idx, plan.gather.len() as i64));
            out(gf, t_gath);
            if let (Some(d), false) = (&plan.distance, runs.is_empty()) {
                let p = d.cells_desc.len() as i64;
                // Head mean with cells as rows [n_tok, n_kv], plus a zero row at n_kv.
                let mt = sys::ggml_pad(c, sys::ggml_scale(c, head_sum(at), 1.0 / n_head as f32), 0, 1, 0, 0);
                let rows = input(sys::GGML_TYPE_I32, p, 1);
                inputs.push((rows, Upload::I32(d.cells_desc)));
                // Positions p_hi, p_hi - 1, ... as columns of each query's row, zero-padded.
                let g = sys::ggml_get_rows(c, mt, sys::ggml_reshape_1d(c, rows, p));
                let x = sys::ggml_pad(c, sys::ggml_cont(c, sys::ggml_transpose(c, g)), (p - 1) as i32, 0, 0, 0);
                // Skewed rows: element e of row i is query i's attention at distance e.
                let nb1 = ((2 * p - 2) * 4) as usize;
                let skew = |e0: usize, len: usize| sys::ggml_view_2d(c, x, len as i64, ne_tok, nb1, (d.offset + e0) * 4);
                for r in &runs {
                    let (t, n_cols) = match r.single {
                        true => (sys::ggml_cont(c, skew(r.e0, r.e1 - r.e0)), r.e1 - r.e0),
                        false => (sys::ggml_sum_rows(c, skew(r.e0, r.e1 - r.e0)), 1),
                    };
                    out(gf, t);
                    t_dist.push((t, r.bucket_end - n_cols, n_cols));
                }
            }
            if let Some(f) = &plan.flow {
                let s = sys::ggml_new_tensor_3d(c, sys::GGML_TYPE_F32, ne_kv, 1, ne_head);
                sys::ggml_set_input(s);
                inputs.push((s, Upload::F32(f.scale)));
                let fm = head_sum(sys::ggml_mul(c, a3, s));
                t_rows = sys::ggml_sum_rows(c, fm);
                out(gf, t_rows);
                if f.pred_from < n_tok {
                    let k = (n_tok - f.pred_from) as i64;
                    t_pred = sys::ggml_cont(c, sys::ggml_view_2d(c, fm, ne_kv, k, (*fm).nb[1], f.pred_from * (*fm).nb[1]));
                    out(gf, t_pred);
                }
            }
            gf
        };
        let mut col_data = vec![vec![]; cols.len()];
        let mut out = AttnOut::default();
        let mut dist = vec![vec![]; t_dist.len()];
        let mut outputs: Vec<(*mut sys::ggml_tensor, &mut Vec<f32>)> = vec![(t_gath, &mut out.gathered)];
        for (&(_, t), v) in cols.iter().zip(col_data.iter_mut()) {
            outputs.push((t, v));
        }
        for (&(t, _, _), v) in t_dist.iter().zip(dist.iter_mut()) {
            outputs.push((t, v));
        }
        for (t, v) in [(t_rows, &mut out.flow_rows), (t_pred, &mut out.flow_pred)] {
            if !t.is_null() {
                outputs.push((t, v));
            }
        }
        self.run(&ctx, graph, &inputs, &mut outputs)?;
        let n_w = plan.ranges.len();
        out.cols = vec![0.0; n_w * n_kv * n_head];
        for (&(w, _), v) in cols.iter().zip(&col_data) {
            for (ch, x) in v.iter().enumerate() {
                out.cols[w + n_w * ch] = *x;
            }
        }
        if let Some(d) = &plan.distance {
            let nb = d.n_buckets;
            out.distance = vec![0.0; nb * n_tok];
            for (&(_, b0, n_cols), v) in t_dist.iter().zip(&dist) {
                for i in 0..n_tok {
                    out.distance[i * nb + b0..i * nb + b0 + n_cols].copy_from_slice(&v[i * n_cols..(i + 1) * n_cols]);
                }
            }
        }
        Ok(out)
    }

    /// Reduce one activation node on its device (see [`ActPlan`]): per row, the sum of
    /// squares, the three largest |x| with their dimensions and the median |x| (from one
    /// descending `argsort` of |x|), the chosen dimensions' values and per-head sums of
    /// squares. Only these come back, not the `width x n_rows` activation.
    pub fn reduce_activation(&mut self, t: &TensorView, plan: &ActPlan) -> Result<ActOut, DeviceError> {
        let (w, n_rows, stride) = (plan.width, plan.n_rows, plan.row_stride);
        if !t.is_f32() || t.nb()[0] != 4 {
            return Err(DeviceError::Layout { name: t.name().into(), ty: t.type_name().into() });
        }
        let extent = (n_rows.max(1) - 1) * stride + w;
        if w == 0 || n_rows == 0 || stride < w || extent * 4 > t.nbytes() {
            return Err(DeviceError::Plan(format!("{n_rows} rows of {w} floats {stride} apart in a {}-byte tensor", t.nbytes())));
        }
        if plan.dims.iter().any(|&d| d >= w) || plan.n_heads > 0 && w % plan.n_heads != 0 {
            return Err(DeviceError::Plan(format!("dims {:?} or {} heads for rows of {w}", plan.dims, plan.n_heads)));
        }
        let k_top = w.min(3);
        let mid = w / 2;
        let nd = plan.dims.len();
        let dims_idx: Vec<i32> = (0..n_rows).flat_map(|_| plan.dims.iter().map(|&d| d as i32)).collect();
        let ctx = GraphCtx::new(32);
        let c = ctx.ptr();
        let (ne_w, ne_r) = (w as i64, n_rows as i64);
        let mut inputs: Vec<(*mut sys::ggml_tensor, Upload)> = vec![];
        // SAFETY: tensors of `ctx` and the aliased scheduler memory, extents checked above;
        // every view below lies inside the tensor it views (checked again in `run`).
        let (graph, outs) = unsafe {
            let x = alias(c, t, extent)?;
            let rows = sys::ggml_view_2d(c, x, ne_w, ne_r, stride * 4, 0);
            let x2 = if stride == w { rows } else { sys::ggml_cont(c, rows) };
            let a = sys::ggml_abs(c, x2);
            let a3 = sys::ggml_reshape_3d(c, a, 1, ne_w, ne_r);
            let idx = sys::ggml_argsort(c, a, sys::GGML_SORT_ORDER_DESC);
            let pick = |i0: usize, k: usize| sys::ggml_view_2d(c, idx, k as i64, ne_r, (*idx).nb[1], i0 * 4);
            let top_i = pick(0, k_top);
            // Descending order: the median's one or two middle values (see `median_in_place`).
            let med_i = if w % 2 == 1 { pick(mid, 1) } else { pick(mid - 1, 2) };
            let sq = sys::ggml_sqr(c, x2);
            let mut o = vec![sys::ggml_sum_rows(c, sq), sys::ggml_get_rows(c, a3, top_i), sys::ggml_cont(c, top_i), sys::ggml_get_rows(c, a3, med_i)];
            if plan.n_heads > 0 {
                o.push(sys::ggml_sum_rows(c, sys::ggml_reshape_2d(c, sq, (w / plan.n_heads) as i64, (plan.n_heads * n_rows) as i64)));
            }
            if nd > 0 {
                let di = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_I32, nd as i64, ne_r);
                sys::ggml_set_input(di);
                inputs.push((di, Upload::I32(&dims_idx)));
                o.push(sys::ggml_get_rows(c, sys::ggml_reshape_3d(c, x2, 1, ne_w, ne_r), di));
            }
            let gf = sys::ggml_new_graph(c);
            for &t in &o {
                sys::ggml_set_output(t);
                sys::ggml_build_forward_expand(gf, t);
            }
            (gf, o)
        };
        let mut data = vec![vec![]; outs.len()];
        let mut outputs: Vec<(*mut sys::ggml_tensor, &mut Vec<f32>)> = outs.iter().copied().zip(data.iter_mut()).collect();
        self.run(&ctx, graph, &inputs, &mut outputs)?;
        let mut it = data.into_iter();
        let mut next = || it.next().unwrap_or_default();
        let (sumsq, top_abs, top_bits, med) = (next(), next(), next(), next());
        let median_abs = match w % 2 {
            1 => med,
            // `[hi, lo]` per row: the lower half's maximum is the second.
            _ => med.chunks_exact(2).map(|p| (p[1] + p[0]) / 2.0).collect(),
        };
        let head_sumsq = if plan.n_heads > 0 { next() } else { vec![] };
        let values = if nd > 0 { next() } else { vec![] };
        Ok(ActOut { sumsq, top_abs, top_dim: top_bits.iter().map(|x| x.to_bits() as i32).collect(), k_top, median_abs, values, head_sumsq })
    }

    /// Check one micro-batch's attention mask against the cell mirror on the device (see
    /// [`MaskPlan`]); only per-query and per-cell counts come back, not the mask.
    pub fn check_mask(&mut self, mask: &TensorView, plan: &MaskPlan) -> Result<MaskOut, DeviceError> {
        let (n_kv, n_tok) = (plan.cell_pos.len(), plan.q.len());
        let stride = mask.nb()[1] / 4;
        let extent = (n_tok.max(1) - 1) * stride + n_kv;
        if !mask.is_f32() || mask.nb()[0] != 4 {
            return Err(DeviceError::Layout { name: mask.name().into(), ty: mask.type_name().into() });
        }
        if n_kv == 0 || n_tok == 0 || plan.lo.len() != n_tok || mask.ne()[0] < n_kv || stride < n_kv || extent * 4 > mask.nbytes() {
            return Err(DeviceError::Plan(format!("mask check of {n_tok} queries and {n_kv} cells on a {:?} mask", mask.ne())));
        }
        let index: Vec<f32> = (0..n_tok).map(|k| k as f32).collect();
        let ctx = GraphCtx::new(48);
        let c = ctx.ptr();
        let (ne_kv, ne_tok) = (n_kv as i64, n_tok as i64);
        let mut inputs: Vec<(*mut sys::ggml_tensor, Upload)> = vec![];
        // SAFETY: tensors of `ctx` and the aliased mask memory, extents checked above.
        let (graph, outs) = unsafe {
            let m = sys::ggml_view_2d(c, alias(c, mask, extent)?, ne_kv, ne_tok, stride * 4, 0);
            let input = |ne0: i64, ne1: i64| {
                let t = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, ne0, ne1);
                sys::ggml_set_input(t);
                t
            };
            let (cp, lo, q, k) = (input(ne_kv, 1), input(1, ne_tok), input(1, ne_tok), input(ne_tok, 1));
            for (t, d) in [(cp, plan.cell_pos), (lo, plan.lo), (q, plan.q), (k, &index[..])] {
                inputs.push((t, Upload::F32(d)));
            }
            // Visible: the mask entry is above -inf (x + 1e30 > 0 for every finite x).
            let vis = sys::ggml_step(c, sys::ggml_scale_bias(c, m, 1.0, 1e30));
            // Expected: lo_k <= p_c <= q_k (positions are integers; empty cells are -1).
            let half_step = |x: *mut sys::ggml_tensor| sys::ggml_step(c, sys::ggml_scale_bias(c, x, 1.0, 0.5));
            let ge = half_step(sys::ggml_sub(c, sys::ggml_repeat_4d(c, cp, ne_kv, ne_tok, 1, 1), lo));
            let le = half_step(sys::ggml_sub(c, sys::ggml_repeat_4d(c, q, ne_kv, ne_tok, 1, 1), cp));
            let d = sys::ggml_sub(c, vis, sys::ggml_mul(c, ge, le));
            let unexplained = sys::ggml_relu(c, d);
            let hidden = sys::ggml_relu(c, sys::ggml_neg(c, d));
            // Per cell, over queries: rows of the transpose.
            let ut = sys::ggml_cont(c, sys::ggml_transpose(c, unexplained));
            let o = vec![sys::ggml_sum_rows(c, unexplained), sys::ggml_sum_rows(c, hidden), sys::ggml_sum_rows(c, ut), sys::ggml_sum_rows(c, sys::ggml_mul(c, ut, k))];
            let gf = sys::ggml_new_graph(c);
            for &t in &o {
                sys::ggml_set_output(t);
                sys::ggml_build_forward_expand(gf, t);
            }
            (gf, o)
        };
        let mut data = vec![vec![]; outs.len()];
        let mut outputs: Vec<(*mut sys::ggml_tensor, &mut Vec<f32>)> = outs.iter().copied().zip(data.iter_mut()).collect();
        self.run(&ctx, graph, &inputs, &mut outputs)?;
        let mut it = data.into_iter();
        let mut next = || it.next().unwrap_or_default();
        Ok(MaskOut { unexplained: next(), hidden: next(), col_count: next(), col_index_sum: next() })
    }

    /// Add `log(keep)` to a `kq` tensor in place: `-inf` where [`HidePlan`] hides, `+0` elsewhere.
    pub fn hide(&mut self, t: &TensorView, plan: &HidePlan) -> Result<(), DeviceError> {
        let [n_kv, n_tok, n_head, _] = t.ne();
        check_contiguous(t)?;
        let g = plan.n_groups;
        if g == 0 || n_head % g != 0 || plan.cell_pos.len() != n_kv || plan.query_pos.len() != n_tok || plan.hidden.len() != n_kv * g {
            return Err(DeviceError::Plan(format!("hide plan for {n_kv} cells, {n_tok} queries, {n_head} heads in {g} groups")));
        }
        let ctx = GraphCtx::new(32);
        let c = ctx.ptr();
        let (ne_kv, ne_tok, ne_g) = (n_kv as i64, n_tok as i64, g as i64);
        let mut inputs: Vec<(*mut sys::ggml_tensor, Upload)> = vec![];
        // SAFETY: tensors of `ctx` and the aliased scheduler memory, shapes checked above.
        let graph = unsafe {
            let kq = alias(c, t, n_kv * n_tok * n_head)?;
            let kq4 = sys::ggml_reshape_4d(c, kq, ne_kv, ne_tok, (n_head / g) as i64, ne_g);
            let cp = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, ne_kv, 1);
            let qp = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, 1, ne_tok);
            let hid = sys::ggml_new_tensor_4d(c, sys::GGML_TYPE_F32, ne_kv, 1, 1, ne_g);
            for (x, d) in [(cp, plan.cell_pos), (qp, plan.query_pos), (hid, plan.hidden)] {
                sys::ggml_set_input(x);
                inputs.push((x, Upload::F32(d)));
            }
            // dist[c, i] = q_i - p_c; visible where 0 < dist < window.
            let dist = sys::ggml_sub(c, sys::ggml_repeat_4d(c, qp, ne_kv, ne_tok, 1, 1), cp);
            let vis = sys::ggml_mul(c, sys::ggml_step(c, dist), sys::ggml_step(c, sys::ggml_scale_bias(c, dist, -1.0, plan.window)));
            let hide = sys::ggml_mul(c, sys::ggml_repeat_4d(c, vis, ne_kv, ne_tok, 1, ne_g), hid);
            let log_keep = sys::ggml_log(c, sys::ggml_scale_bias(c, hide, -1.0, 1.0));
            let r = sys::ggml_add_inplace(c, kq4, log_keep);
            let gf = sys::ggml_new_graph(c);
            sys::ggml_build_forward_expand(gf, r);
            gf
        };
        self.run(&ctx, graph, &inputs, &mut [])
    }
}

/// The device whose memory `buf` is: the one its buffer type names, or the CPU for host
/// buffers whose type names none (ggml's plain CPU buffers).
///
/// # Safety
/// `buf` must be a live, non-null backend buffer.
unsafe fn device_of(buf: sys::ggml_backend_buffer_t) -> sys::ggml_backend_dev_t {
    // SAFETY: see the function's contract; registry lookups are always valid.
    unsafe {
        let dev = sys::ggml_backend_buft_get_device(sys::ggml_backend_buffer_get_type(buf));
        if dev.is_null() && sys::ggml_backend_buffer_is_host(buf) {
            sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU)
        } else {
            dev
        }
    }
}

/// Distances `e0..e1` of one or more consecutive buckets: several one-distance buckets
/// (`single`), or the part below the span of one wider bucket. `bucket_end`: one past the
/// last bucket covered so far.
#[derive(Debug, PartialEq)]
struct BucketRun {
    e0: usize,
    e1: usize,
    single: bool,
    bucket_end: usize,
}

/// The runs covering distances `0..span`, in bucket order; buckets must be consecutive
/// ranges of distance, as [`DistPlan::bucket`] gives them.
fn bucket_runs(span: usize, n_buckets: usize, bucket: &dyn Fn(usize) -> usize) -> Result<Vec<BucketRun>, DeviceError> {
    let mut runs: Vec<BucketRun> = vec![];
    let mut e = 0;
    while e < span {
        let b = bucket(e);
        if b >= n_buckets {
            break;
        }
        if b != runs.last().map_or(0, |r| r.bucket_end) {
            return Err(DeviceError::Plan(format!("distance {e} falls in bucket {b}, not the next one")));
        }
        let mut e1 = e + 1;
        while e1 < span && bucket(e1) == b {
            e1 += 1;
        }
        let single = e1 == e + 1;
        match runs.last_mut() {
            Some(r) if single && r.single => {
                r.e1 = e1;
                r.bucket_end = b + 1;
            }
            _ => runs.push(BucketRun { e0: e, e1, single, bucket_end: b + 1 }),
        }
        e = e1;
    }
    Ok(runs)
}

fn check_contiguous(t: &TensorView) -> Result<(), DeviceError> {
    // SAFETY: live tensor.
    let contiguous = unsafe { sys::ggml_is_contiguous(t.raw()) };
    if !t.is_f32() || !contiguous {
        return Err(DeviceError::Layout { name: t.name().into(), ty: t.type_name().into() });
    }
    Ok(())
}

/// A 1-D tensor of `ctx` that aliases `t`'s memory (no copy).
///
/// # Safety
/// `ctx` must be a live no-alloc context and `t` a live, contiguous, allocated tensor of at
/// least `n` f32 elements that stays alive until the graph using the alias has run.
unsafe fn alias(ctx: *mut sys::ggml_context, t: &TensorView, n: usize) -> Result<*mut sys::ggml_tensor, DeviceError> {
    let raw = t.raw();
    // SAFETY: see the function's contract.
    unsafe {
        let a = sys::ggml_new_tensor_1d(ctx, sys::GGML_TYPE_F32, n as i64);
        if (*raw).buffer.is_null() || (*raw).data.is_null() {
            return Err(DeviceError::NoBuffer(t.name().into()));
        }
        if sys::ggml_backend_tensor_alloc((*raw).buffer, a, (*raw).data) != sys::GGML_STATUS_SUCCESS {
            return Err(DeviceError::NoBuffer(t.name().into()));
        }
        Ok(a)
    }
}

impl Drop for DeviceCompute {
    fn drop(&mut self) {
        // SAFETY: created in `for_tensor`, freed once, allocator before its backend.
        unsafe {
            sys::ggml_gallocr_free(self.galloc.as_ptr());
            sys::ggml_gallocr_free(self.measure.as_ptr());
            for old in self.retired.drain(..) {
                sys::ggml_gallocr_free(old.as_ptr());
            }
            for b in self.io.take().into_iter().chain(self.io_retired.drain(..)) {
                sys::ggml_backend_buffer_free(b.as_ptr());
            }
            sys::ggml_backend_free(self.backend.as_ptr());
        }
    }
}

/// A compute device as ggml sees it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    pub description: String,
    /// `cpu`, `gpu`, `igpu` or `accel`.
    pub kind: String,
    pub memory_total_mb: u64,
}

/// Every device ggml registered in this process (the CPU always; GPUs of the enabled backends).
pub fn devices() -> Vec<DeviceInfo> {
    super::init_backend();
    // SAFETY: registry queries; indices below the count are valid.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| {
                let d = sys::ggml_backend_dev_get(i);
                let (mut free, mut total) = (0usize, 0usize);
                sys::ggml_backend_dev_memory(d, &mut free, &mut total);
                let kind = match sys::ggml_backend_dev_type(d) {
                    sys::GGML_BACKEND_DEVICE_TYPE_CPU => "cpu",
                    sys::GGML_BACKEND_DEVICE_TYPE_GPU => "gpu",
                    sys::GGML_BACKEND_DEVICE_TYPE_IGPU => "igpu",
                    _ => "accel",
                };
                DeviceInfo {
                    name: cstr(sys::ggml_backend_dev_name(d)),
                    description: cstr(sys::ggml_backend_dev_description(d)),
                    kind: kind.into(),
                    memory_total_mb: (total / (1 << 20)) as u64,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::attention::{bucket_range, distance_bucket};

    /// The activation graph, run on the CPU backend over a tensor of known values, gives the
    /// host reduction's rows: odd and even widths (the median's one or two middle values),
    /// rows further apart than their width, tied magnitudes, chosen dims and head norms.
    #[test]
    fn activation_graph_equals_host_rows() {
        use crate::capture::activation::ActivationAcc;
        for (width, stride, heads) in [(7usize, 7usize, 0usize), (6, 9, 3), (1, 1, 0), (2, 5, 2), (64, 64, 4), (9, 12, 0)] {
            let n_rows = 5;
            let mut rng = crate::rng::SplitMix64(width as u64 * 31 + stride as u64);
            // Every fourth value is -1 or 1: ties among the magnitudes.
            let data: Vec<f32> = (0..(n_rows - 1) * stride + width).map(|i| if i % 4 == 0 { [1.0, -1.0][i % 8 / 4] } else { 3.0 * rng.gauss() as f32 }).collect();
            let dims = vec![0, width - 1, width / 2];
            let queries: Vec<i32> = (0..n_rows as i32).map(|i| 2 * i).collect();
            on_cpu_tensor(data.len(), 1, &data, |view| {
                let mut dc = DeviceCompute::for_tensor(view).unwrap();
                let plan = ActPlan { width, n_rows, row_stride: stride, dims: &dims, n_heads: heads };
                let out = dc.reduce_activation(view, &plan).unwrap();
                assert_eq!((dc.copies_up, dc.copies_down), (1, 1));
                let mut host = ActivationAcc::new("x", 1, dims.clone());
                host.heads = (heads > 0).then_some(heads);
                let mut dev = host.clone();
                host.add(0, &data, width, stride, &queries).unwrap();
                dev.add_reduced(0, &out, width, &queries).unwrap();
                let (h, d) = (host.layers[0].as_ref().unwrap(), dev.layers[0].as_ref().unwrap());
                let case = format!("width {width}, stride {stride}, heads {heads}");
                assert_eq!((h.n_pos, &h.median_abs, &h.values), (d.n_pos, &d.median_abs, &d.values), "{case}");
                for (a, b) in h.norm.iter().chain(&h.head_norm).zip(d.norm.iter().chain(&d.head_norm)) {
                    assert!((a - b).abs() <= 1e-6 * a.abs(), "{case}: norm {a} vs {b}");
                }
                for (p, (ht, dt)) in h.top3.iter().zip(&d.top3).enumerate() {
                    for k in 0..3 {
                        assert_eq!(ht[k].1, dt[k].1, "{case}: top |x| {k} at {p}");
                        let tied = ht.iter().filter(|x| x.1 == ht[k].1).count() > 1;
                        assert!(ht[k].0 == dt[k].0 || tied, "{case}: top dim {k} at {p}: {ht:?} vs {dt:?}");
                    }
                }
                assert!(h.median_abs.iter().step_by(2).all(|&m| m > 0.0), "{case}: rows were written");
            });
        }
    }

    /// `f` over a tensor `[ne0, ne1]` of the CPU backend holding `data`.
    fn on_cpu_tensor<T>(ne0: usize, ne1: usize, data: &[f32], f: impl FnOnce(&TensorView) -> T) -> T {
        assert_eq!(data.len(), ne0 * ne1);
        super::super::init_backend();
        let ctx = GraphCtx::new(1);
        // SAFETY: a CPU buffer sized for the one tensor, placed at its base and filled; the
        // view (and whatever `f` made of it) is gone before the buffer is freed.
        unsafe {
            let t = sys::ggml_new_tensor_2d(ctx.ptr(), sys::GGML_TYPE_F32, ne0 as i64, ne1 as i64);
            let buft = sys::ggml_backend_dev_buffer_type(sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU));
            let buf = sys::ggml_backend_buft_alloc_buffer(buft, sys::ggml_nbytes(t) + 256);
            assert!(!buf.is_null());
            assert_eq!(sys::ggml_backend_tensor_alloc(buf, t, sys::ggml_backend_buffer_get_base(buf)), sys::GGML_STATUS_SUCCESS);
            sys::ggml_backend_tensor_set(t, data.as_ptr() as *const _, 0, data.len() * 4);
            let r = f(&TensorView::new(NonNull::new(t).unwrap()));
            sys::ggml_backend_buffer_free(buf);
            r
        }
    }

    /// The device mask check, run on the CPU backend, accepts the usual micro-batches and then
    /// learns what the host's per-cell checks learn; a corrupted mask is never accepted
    /// (it goes to the host, which names the problem).
    #[test]
    fn device_mask_check_learns_what_the_host_learns() {
        use crate::capture::cells::CellMap;
        let mut rng = crate::rng::SplitMix64(11);
        let (mut accepted, mut refused) = (0, 0);
        for case in 0..120 {
            let window = [None, Some(8), Some(5)][case % 3];
            let n_kv = 8 + rng.next_u64() as usize % 9;
            let n0 = 3 + rng.next_u64() as usize % 4;
            let n = 1 + rng.next_u64() as usize % window.map_or(4, |w: i32| (w as usize).min(4));
            // The mirror after a first micro-batch of n0 tokens in cells 0.., some then removed.
            let mut map = CellMap::new(window);
            let first: Vec<i32> = (0..n0 as i32).collect();
            let vis0 = |p: i32, q: i32| p <= q && window.is_none_or(|w| q - p < w);
            map.assign(n_kv, &first, |k, c| c < n0 && vis0(c as i32, first[k])).unwrap();
            let mut truth: Vec<i32> = (0..n_kv as i32).map(|c| if (c as usize) < n0 { c } else { -1 }).collect();
            if case % 2 == 1 {
                let p = (rng.next_u64() % n0 as u64) as i32;
                map.remove(p, p + 1);
                truth[p as usize] = -1;
            }
            // The next micro-batch: consecutive queries, each in a free (or stale) cell.
            let queries: Vec<i32> = (0..n as i32).map(|i| n0 as i32 + 2 + i).collect();
            for &q in &queries {
                let free: Vec<usize> = (0..n_kv).filter(|&c| truth[c] < 0 || window.is_some_and(|w| queries[0] - truth[c] >= w)).collect();
                let c = free[rng.next_u64() as usize % free.len()];
                truth[c] = q;
            }
            let mut data: Vec<f32> = queries.iter().flat_map(|&q| truth.iter().map(move |&p| if p >= 0 && vis0(p, q) { 0.0 } else { f32::NEG_INFINITY })).collect();
            let corrupt = case % 4 == 2;
            if corrupt {
                let i = rng.next_u64() as usize % data.len();
                data[i] = if data[i] == 0.0 { f32::NEG_INFINITY } else { 0.0 };
            }
            let cell_pos: Vec<f32> = (0..n_kv).map(|c| map.get(c).unwrap_or(-1) as f32).collect();
            let lo: Vec<f32> = queries.iter().map(|&q| window.map_or(0, |w| (q - w + 1).max(0)) as f32).collect();
            let q: Vec<f32> = queries.iter().map(|&q| q as f32).collect();
            let out = on_cpu_tensor(n_kv, n, &data, |view| DeviceCompute::for_tensor(view).unwrap().check_mask(view, &MaskPlan { cell_pos: &cell_pos, lo: &lo, q: &q }).unwrap());
            let (mut dev, mut host) = (map.clone(), map.clone());
            let by_device = dev.assign_counted(n_kv, &queries, &out);
            let by_host = host.assign_rows(n_kv, &queries, &data, n_kv);
            if by_device {
                accepted += 1;
                assert!(by_host.is_ok(), "case {case}: the device accepted what the host refuses: {by_host:?}");
                assert_eq!((0..n_kv).map(|c| dev.get(c)).collect::<Vec<_>>(), (0..n_kv).map(|c| host.get(c)).collect::<Vec<_>>(), "case {case}");
            } else {
                refused += 1;
                assert!(corrupt, "case {case}: a clean micro-batch was left to the host: {out:?}");
                assert_eq!((0..n_kv).map(|c| dev.get(c)).collect::<Vec<_>>(), (0..n_kv).map(|c| map.get(c)).collect::<Vec<_>>(), "case {case}: refused but changed");
            }
        }
        assert!(accepted > 60 && refused > 10, "accepted {accepted}, refused {refused}");
    }

    /// The runs cover every distance below the span once, in bucket order, and name the
    /// buckets they end at; neighbouring one-distance buckets are merged, wider ones kept apart.
    #[test]
    fn bucket_runs_cover_the_span_in_bucket_order() {
        for span in [1, 2, 63, 64, 65, 100, 128, 129, 1000, 4096] {
            let n_buckets = distance_bucket(8191) + 1;
            let runs = bucket_runs(span, n_buckets, &distance_bucket).unwrap();
            let mut next_e = 0;
            let mut col = 0;
            for r in &runs {
                assert_eq!(r.e0, next_e, "span {span}: gap before {r:?}");
                next_e = r.e1;
                if r.single {
                    for e in r.e0..r.e1 {
                        assert_eq!(distance_bucket(e), col, "span {span}: distance {e}");
                        col += 1;
                    }
                } else {
                    let b = distance_bucket(r.e0);
                    assert_eq!((b, bucket_range(b).0), (col, r.e0), "span {span}: {r:?}");
                    assert_eq!(r.e1, (bucket_range(b).1 + 1).min(span), "span {span}: {r:?}");
                    col += 1;
                }
                assert_eq!(r.bucket_end, col);
            }
            assert_eq!(next_e, span);
            // The one-distance buckets below 64 form one run (a wide bucket cut to one
            // distance by the span may form a second).
            assert!(runs[0].single && runs[0].e1 >= span.min(64), "span {span}: {runs:?}");
            assert!(runs.iter().filter(|r| r.single).count() <= 2, "span {span}: {runs:?}");
        }
        // Buckets past n_buckets are left out; a bucket out of order is refused.
        let runs = bucket_runs(1000, 3, &distance_bucket).unwrap();
        assert_eq!(runs, vec![BucketRun { e0: 0, e1: 3, single: true, bucket_end: 3 }]);
        assert!(bucket_runs(10, 10, &|e| [0, 2, 1][e % 3]).is_err());
    }
}
