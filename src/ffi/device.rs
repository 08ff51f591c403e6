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
//! Each graph's inputs and outputs are packed into one device buffer, so a run costs at most
//! one upload and one download; a graph is built once per shape and plan and rerun for every
//! layer over that layer's memory.
//!
//! The graphs use only ops that every backend computes in f32: element-wise ops, copies,
//! views, `pad`, `get_rows`, `sum_rows`, average `pool_2d` and `argsort`. Never `mul_mat` or `out_prod`: CUDA runs those
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
/// Why a device graph could not run (capture then falls back to the host).
pub enum DeviceError {
    #[error("tensor {0} has no backend buffer")]
    /// The tensor has no backend buffer.
    NoBuffer(String),
    #[error("no ggml device owns the buffer of tensor {0}")]
    /// No ggml device owns the buffer.
    NoDevice(String),
    #[error("ggml could not start a backend on device {0}")]
    /// The backend would not start.
    Init(String),
    #[error("device {dev} cannot run ggml op {op}: reductions fall back to copying to the host")]
    /// The device cannot run an op.
    Unsupported {
        /// Device name.
        dev: String,
        /// Op name.
        op: String,
    },
    #[error("tensor {name} is not contiguous f32 (type {ty}): it cannot be reduced on the device")]
    /// The tensor is not laid out as the graph needs.
    Layout {
        /// Tensor name.
        name: String,
        /// Its type.
        ty: String,
    },
    #[error("ggml could not allocate {0} bytes on device {1}")]
    /// Device memory for a graph could not be allocated (bytes, device).
    Alloc(usize, String),
    #[error("graph compute failed on device {0}")]
    /// The graph failed to run.
    Compute(String),
    #[error("reduction inputs do not match the tensor: {0}")]
    /// The plan does not fit the tensor.
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
    /// Distance profile, when wanted.
    pub distance: Option<DistPlan<'a>>,
    /// Information flow, when wanted.
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
    /// Distance buckets.
    pub n_buckets: usize,
    /// Bucket of a distance (`>= n_buckets`: not counted).
    pub bucket: &'a dyn Fn(usize) -> usize,
}

/// Gradient-free flow: `F[c, i] = sum_h A[c, i, h] * scale[h][c]`; row sums per query and
/// the rows of queries `pred_from..n_tok`.
pub struct FlowPlan<'a> {
    /// `[h * n_kv + c]`.
    pub scale: &'a [f32],
    /// First query whose full row comes back.
    pub pred_from: usize,
}

/// Results copied back from the device.
#[derive(Debug, Default, Clone)]
pub struct AttnOut {
    /// Per range `w`: `[c + n_kv * h]` (empty for an empty range).
    pub cols: Vec<Vec<f32>>,
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
    /// Row width (floats).
    pub width: usize,
    /// Rows.
    pub n_rows: usize,
    /// Floats from one row to the next.
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
    /// Dimensions of `top_abs`.
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
    /// Per cell: its position (-1 when empty).
    pub cell_pos: &'a [f32],
    /// Per query: the first position it may see.
    pub lo: &'a [f32],
    /// Per query: its position.
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
    /// Per cell: sum of those queries' indices.
    pub col_index_sum: Vec<f32>,
}

/// Which (cell, query, head group) entries of `kq` to hide: cell `c` of head group `g` is
/// hidden from query `i` when `hidden[g * n_kv + c] == 1` and `0 < q_i - p_c < window`.
pub struct HidePlan<'a> {
    /// Per cell: its position.
    pub cell_pos: &'a [f32],
    /// Per query: its position.
    pub query_pos: &'a [f32],
    /// Per head group and cell: 1 when hidden.
    pub hidden: &'a [f32],
    /// Head groups.
    pub n_groups: usize,
    /// Sliding window (positions), or infinity.
    pub window: f32,
}

/// A ggml backend on the device that owns a tensor's buffer. A graph is built, checked,
/// planned and placed in device memory once for a shape and plan (`Prepared`), then run
/// again for every tensor that matches them: the layers of a micro-batch differ only in the
/// memory they read, so each of them costs one repointing of the alias, at most one upload
/// (none when the inputs are the ones already there), the kernels and one download.
pub struct DeviceCompute {
    dev: sys::ggml_backend_dev_t,
    backend: NonNull<sys::ggml_backend>,
    /// Graphs kept ready, each in its own memory: attention needs two when a model's layers
    /// alternate between a sliding-window and a global cache; activations one per node kind.
    slots: Vec<Slot>,
    /// An allocator that only plans (it never holds a buffer): the size a graph needs.
    measure: NonNull<sys::ggml_gallocr>,
    name: String,
    /// Host staging for the packed inputs and outputs, in 4-byte words (f32 or i32).
    stage_up: Vec<u32>,
    stage_down: Vec<f32>,
    /// Runs so far: the slot least recently run is the one rebuilt.
    clock: u64,
    /// Bytes copied device -> host and host -> device by this object.
    pub bytes_down: u64,
    /// Bytes copied host -> device.
    pub bytes_up: u64,
    /// Copies made each way: one download per graph run that has outputs, one upload per run
    /// whose inputs differ from the ones its slot holds.
    pub copies_down: u64,
    /// Copies host -> device.
    pub copies_up: u64,
    /// Graphs built, and graphs run (a run reuses a built graph when it can).
    pub builds: u64,
    /// Graphs run.
    pub runs: u64,
    /// Wall time spent building and running graphs (uploads, compute, downloads).
    pub seconds: f64,
}

// SAFETY: the backend, allocators and graphs are used only through `&mut self`, from one
// thread at a time (the thread running `llama_decode`); ggml backends are not tied to their
// creating thread.
unsafe impl Send for DeviceCompute {}

/// Device memory for one prepared graph: a graph allocator for its intermediate tensors and
/// a buffer for its packed inputs and outputs. Outgrown ones are kept until the
/// [`DeviceCompute`] is dropped: letting ggml free a buffer while its backend lives crashed
/// Mesa's llvmpipe Vulkan device (its threads later read the destroyed buffer); growth by
/// doubling keeps what is kept below the live buffer's size.
struct Slot {
    galloc: NonNull<sys::ggml_gallocr>,
    retired: Vec<NonNull<sys::ggml_gallocr>>,
    io: Option<NonNull<sys::ggml_backend_buffer>>,
    io_retired: Vec<NonNull<sys::ggml_backend_buffer>>,
    prepared: Option<Prepared>,
    /// The clock of its last run.
    used: u64,
}

/// What a graph builder makes: the graph, the tensor aliasing the observed tensor's memory,
/// the inputs (filled from the run's [`Upload`]s, in this order) and the outputs (read back
/// in this order).
struct Built {
    graph: *mut sys::ggml_cgraph,
    alias: *mut sys::ggml_tensor,
    inputs: Vec<*mut sys::ggml_tensor>,
    outputs: Vec<*mut sys::ggml_tensor>,
}

impl Built {
    /// Add `o` (and what it needs) to the graph as the next output.
    ///
    /// # Safety
    /// `o` must be a tensor of the graph's live context.
    unsafe fn output(&mut self, o: *mut sys::ggml_tensor) {
        // SAFETY: see the function's contract.
        unsafe {
            sys::ggml_set_output(o);
            sys::ggml_build_forward_expand(self.graph, o);
        }
        self.outputs.push(o);
    }
}

/// A built graph with its memory placed, ready to run over any tensor of its signature.
struct Prepared {
    /// Everything the graph's structure depends on: kind, shapes, plan sizes and parameters.
    sig: Vec<i64>,
    /// The graph's tensors (and the two spans over the io buffer).
    _ctx: GraphCtx,
    graph: *mut sys::ggml_cgraph,
    alias: *mut sys::ggml_tensor,
    /// Nodes viewing the alias (ggml points every view at its root tensor): re-derived when
    /// the alias is pointed at another tensor.
    alias_views: Vec<*mut sys::ggml_tensor>,
    /// Per input: word offset in the packed region and element count.
    inputs: Vec<(usize, usize)>,
    in_words: usize,
    in_span: *mut sys::ggml_tensor,
    /// Per output: word offset in the downloaded region and element count.
    outputs: Vec<(usize, usize)>,
    out_words: usize,
    out_span: *mut sys::ggml_tensor,
    /// The words last uploaded, which the io buffer still holds (graphs never write inputs).
    last_up: Option<Vec<u32>>,
}

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

/// Host data to upload into an input tensor.
enum Upload<'a> {
    F32(&'a [f32]),
    I32(&'a [i32]),
}

impl Upload<'_> {
    fn len(&self) -> usize {
        match self {
            Upload::F32(d) => d.len(),
            Upload::I32(d) => d.len(),
        }
    }
    fn write(&self, dst: &mut [u32]) {
        match self {
            Upload::F32(d) => dst.iter_mut().zip(d.iter()).for_each(|(w, x)| *w = x.to_bits()),
            Upload::I32(d) => dst.iter_mut().zip(d.iter()).for_each(|(w, x)| *w = *x as u32),
        }
    }
}

impl DeviceCompute {
    /// A backend on the device whose buffer holds `t`, keeping up to `slots` graphs built
    /// (each in its own device memory, sized for the largest graph it has held).
    pub fn for_tensor(t: &TensorView, slots: usize) -> Result<DeviceCompute, DeviceError> {
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
        let allocs: Vec<Option<NonNull<sys::ggml_gallocr>>> = (0..=slots.max(1)).map(|_| NonNull::new(unsafe { sys::ggml_gallocr_new(sys::ggml_backend_get_default_buffer_type(backend.as_ptr())) })).collect();
        if allocs.iter().any(|a| a.is_none()) {
            // SAFETY: each was created above and is freed once, before the backend.
            unsafe {
                for a in allocs.into_iter().flatten() {
                    sys::ggml_gallocr_free(a.as_ptr());
                }
                sys::ggml_backend_free(backend.as_ptr());
            }
            return Err(DeviceError::Init(name));
        }
        let mut allocs = allocs.into_iter().flatten();
        let measure = allocs.next().expect("slots + 1 allocators");
        let slots = allocs.map(|galloc| Slot { galloc, retired: vec![], io: None, io_retired: vec![], prepared: None, used: 0 }).collect();
        Ok(DeviceCompute {
            dev,
            backend,
            slots,
            measure,
            name,
            stage_up: vec![],
            stage_down: vec![],
            clock: 0,
            bytes_down: 0,
            bytes_up: 0,
            copies_down: 0,
            copies_up: 0,
            builds: 0,
            runs: 0,
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

    /// Replace slot `k`'s allocator by one whose buffer holds `bytes`, keeping the old one.
    fn grow(&mut self, k: usize, bytes: usize) -> Result<(), DeviceError> {
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
        let slot = &mut self.slots[k];
        let old = std::mem::replace(&mut slot.galloc, fresh);
        // SAFETY: valid allocator.
        if unsafe { sys::ggml_gallocr_get_buffer_size(old.as_ptr(), 0) } == 0 {
            // SAFETY: never held a buffer, so nothing on the device refers to it; freed once.
            unsafe { sys::ggml_gallocr_free(old.as_ptr()) };
        } else {
            slot.retired.push(old);
        }
        Ok(())
    }

    /// Slot `k`'s buffer for inputs and outputs, of at least `bytes`: the live one, or a new
    /// one with twice the room (the outgrown one kept, as for the graph allocators).
    fn io_buffer(&mut self, k: usize, bytes: usize) -> Result<sys::ggml_backend_buffer_t, DeviceError> {
        let slot = &mut self.slots[k];
        if let Some(b) = slot.io {
            // SAFETY: a live buffer of this object.
            if unsafe { sys::ggml_backend_buffer_get_size(b.as_ptr()) } >= bytes {
                return Ok(b.as_ptr());
            }
        }
        let want = (2 * bytes).max(1 << 16);
        // SAFETY: valid backend; a null result is checked.
        let fresh = NonNull::new(unsafe { sys::ggml_backend_buft_alloc_buffer(sys::ggml_backend_get_default_buffer_type(self.backend.as_ptr()), want) }).ok_or_else(|| DeviceError::Alloc(want, self.name.clone()))?;
        if let Some(old) = slot.io.replace(fresh) {
            slot.io_retired.push(old);
        }
        Ok(fresh.as_ptr())
    }

    /// Run the graph of signature `sig` over `t`'s memory with `uploads` as its inputs. A slot
    /// holding that graph runs it; otherwise the least recently run slot gets it, built by
    /// `build` in a context of `n_tensors` tensors and prepared there. Returns the slot, whose
    /// outputs [`DeviceCompute::outputs`] reads.
    fn exec(&mut self, t: &TensorView, sig: Vec<i64>, n_tensors: usize, build: impl FnOnce(*mut sys::ggml_context) -> Result<Built, DeviceError>, uploads: &[Upload]) -> Result<usize, DeviceError> {
        let t0 = std::time::Instant::now();
        self.clock += 1;
        let k = match self.slots.iter().position(|s| s.prepared.as_ref().is_some_and(|p| p.sig == sig)) {
            Some(k) => k,
            None => {
                let k = (0..self.slots.len()).min_by_key(|&k| self.slots[k].used).expect("at least one slot");
                // Frees the replaced graph's tensors (metadata only; its memory is the slot's).
                self.slots[k].prepared = None;
                let ctx = GraphCtx::new(n_tensors + 2);
                let built = build(ctx.ptr())?;
                let p = self.prepare(k, sig, ctx, built)?;
                self.slots[k].prepared = Some(p);
                self.builds += 1;
                k
            }
        };
        self.slots[k].used = self.clock;
        let r = self.run_slot(k, t, uploads);
        if r.is_err() {
            // A failed run may leave the alias unplaced: build afresh next time.
            self.slots[k].prepared = None;
        }
        self.seconds += t0.elapsed().as_secs_f64();
        r.map(|_| k)
    }

    /// The outputs of slot `k`'s last run, in the order its builder listed them.
    fn outputs(&self, k: usize) -> impl Iterator<Item = &[f32]> {
        let p = self.slots[k].prepared.as_ref().expect("a slot that ran");
        p.outputs.iter().map(|&(o, n)| &self.stage_down[o..o + n])
    }

    /// Check every node of a built graph, place its inputs and outputs in slot `k`'s io
    /// buffer (inputs packed from 0, outputs after them: each direction is a single copy
    /// whatever the number of tensors, and a GPU pays a fixed latency per copy), and allocate
    /// the rest in the slot's allocator.
    fn prepare(&mut self, k: usize, sig: Vec<i64>, ctx: GraphCtx, b: Built) -> Result<Prepared, DeviceError> {
        let backend = self.backend.as_ptr();
        let graph = b.graph;
        let mut alias_views = vec![];
        // SAFETY: `graph` and its nodes belong to `ctx`, alive here.
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
                if (*node).view_src == b.alias {
                    alias_views.push(node);
                }
            }
        }
        // Offsets in the io buffer: inputs from 0, outputs from `in_end`, each aligned (to
        // whole 4-byte words too: the staging is in words).
        // SAFETY: valid backend; size queries on live tensors of `ctx`.
        let (buft, align) = unsafe {
            let buft = sys::ggml_backend_get_default_buffer_type(backend);
            let a = sys::ggml_backend_buft_get_alignment(buft).max(1);
            (buft, if a % 4 == 0 { a } else { a * 4 })
        };
        let place = |end: &mut usize, t: *mut sys::ggml_tensor| {
            let off = *end;
            // SAFETY: a live tensor of `ctx`.
            *end += unsafe { sys::ggml_backend_buft_get_alloc_size(buft, t) }.div_ceil(align) * align;
            off
        };
        let mut end = 0usize;
        let in_offs: Vec<usize> = b.inputs.iter().map(|&t| place(&mut end, t)).collect();
        let in_end = end;
        let out_offs: Vec<usize> = b.outputs.iter().map(|&t| place(&mut end, t)).collect();
        let total = end;
        let io = self.io_buffer(k, total)?;
        // SAFETY: `io` is live and at least `total` bytes; every tensor is placed inside it at
        // its own aligned offset, computed from its allocation size above. Tensors that already
        // have memory are left alone by the allocator below.
        unsafe {
            let base = sys::ggml_backend_buffer_get_base(io) as *mut u8;
            for (&t, &off) in b.inputs.iter().chain(&b.outputs).zip(in_offs.iter().chain(&out_offs)) {
                if sys::ggml_backend_tensor_alloc(io, t, base.add(off) as *mut _) != sys::GGML_STATUS_SUCCESS {
                    return Err(DeviceError::Alloc(total, self.name.clone()));
                }
            }
        }
        let mut need = 0usize;
        // SAFETY: plans the graph's memory on the allocator that never holds a buffer (planning
        // an outgrown allocator frees its buffer, so it must not be a live one); writes one
        // size per buffer (one).
        unsafe { sys::ggml_gallocr_reserve_n_size(self.measure.as_ptr(), graph, std::ptr::null(), std::ptr::null(), &mut need) };
        // SAFETY: valid allocator with one buffer.
        let have = unsafe { sys::ggml_gallocr_get_buffer_size(self.slots[k].galloc.as_ptr(), 0) };
        if need > have {
            self.grow(k, 2 * need)?;
        }
        // SAFETY: the allocator places every unallocated tensor of the graph in its buffer;
        // tensors aliasing the scheduler's memory or placed in `io` already have memory and
        // are left alone. Only this slot's graph uses the buffer, so the placement holds for
        // every later run of the graph.
        if !unsafe { sys::ggml_gallocr_alloc_graph(self.slots[k].galloc.as_ptr(), graph) } {
            return Err(DeviceError::Alloc(0, self.name.clone()));
        }
        // Two 1-d byte tensors spanning the packed inputs and outputs, for the two copies.
        let span = |off: usize, len: usize| {
            if len == 0 {
                return Ok(std::ptr::null_mut());
            }
            // SAFETY: a tensor of `ctx` (room for two was reserved) placed in `io` over
            // `off..off + len`, inside its `total` bytes.
            unsafe {
                let t = sys::ggml_new_tensor_1d(ctx.ptr(), sys::GGML_TYPE_I8, len as i64);
                let base = sys::ggml_backend_buffer_get_base(io) as *mut u8;
                if sys::ggml_backend_tensor_alloc(io, t, base.add(off) as *mut _) != sys::GGML_STATUS_SUCCESS {
                    return Err(DeviceError::Alloc(total, self.name.clone()));
                }
                Ok(t)
            }
        };
        let (in_span, out_span) = (span(0, in_end)?, span(in_end, total - in_end)?);
        // SAFETY: element counts of live tensors of `ctx`.
        let count = |t: *mut sys::ggml_tensor| unsafe { sys::ggml_nelements(t) } as usize;
        Ok(Prepared {
            sig,
            graph,
            alias: b.alias,
            alias_views,
            inputs: b.inputs.iter().zip(&in_offs).map(|(&t, &o)| (o / 4, count(t))).collect(),
            in_words: in_end / 4,
            in_span,
            outputs: b.outputs.iter().zip(&out_offs).map(|(&t, &o)| ((o - in_end) / 4, count(t))).collect(),
            out_words: (total - in_end) / 4,
            out_span,
            last_up: None,
            _ctx: ctx,
        })
    }

    /// Point slot `k`'s graph at `t`, upload the inputs unless the slot holds them already,
    /// compute, and download the outputs into `stage_down`.
    fn run_slot(&mut self, k: usize, t: &TensorView, uploads: &[Upload]) -> Result<(), DeviceError> {
        let backend = self.backend.as_ptr();
        let p = self.slots[k].prepared.as_mut().expect("prepared by exec");
        let raw = t.raw();
        // SAFETY: the alias and its views are tensors of the slot's live context; `t` is live
        // and at least as large as the alias (the signature fixes the alias's size and every
        // reduction checks it against the tensor before running).
        unsafe {
            if (*raw).buffer.is_null() || (*raw).data.is_null() {
                return Err(DeviceError::NoBuffer(t.name().into()));
            }
            if (*p.alias).data != (*raw).data || (*p.alias).buffer != (*raw).buffer {
                (*p.alias).buffer = std::ptr::null_mut();
                (*p.alias).data = std::ptr::null_mut();
                if sys::ggml_backend_tensor_alloc((*raw).buffer, p.alias, (*raw).data) != sys::GGML_STATUS_SUCCESS {
                    return Err(DeviceError::NoBuffer(t.name().into()));
                }
                for &v in &p.alias_views {
                    (*v).buffer = std::ptr::null_mut();
                    if sys::ggml_backend_view_init(v) != sys::GGML_STATUS_SUCCESS {
                        return Err(DeviceError::NoBuffer(t.name().into()));
                    }
                }
            }
        }
        if uploads.len() != p.inputs.len() || uploads.iter().zip(&p.inputs).any(|(u, &(_, n))| u.len() != n) {
            return Err(DeviceError::Plan("inputs do not match the graph's".into()));
        }
        if p.in_words > 0 {
            self.stage_up.clear();
            self.stage_up.resize(p.in_words, 0);
            for (u, &(o, n)) in uploads.iter().zip(&p.inputs) {
                u.write(&mut self.stage_up[o..o + n]);
            }
            if p.last_up.as_deref() != Some(&self.stage_up[..]) {
                // SAFETY: the span covers `in_words` words of the io buffer; the staging data
                // outlives the synchronize below.
                unsafe { sys::ggml_backend_tensor_set_async(backend, p.in_span, self.stage_up.as_ptr() as *const _, 0, p.in_words * 4) };
                self.bytes_up += (p.in_words * 4) as u64;
                self.copies_up += 1;
                match &mut p.last_up {
                    Some(v) => v.clone_from(&self.stage_up),
                    None => p.last_up = Some(self.stage_up.clone()),
                }
            }
        }
        // SAFETY: graph allocated on this backend; the download below is ordered after it on
        // the backend's queue, and the synchronize waits for both.
        let status = unsafe { sys::ggml_backend_graph_compute_async(backend, p.graph) };
        if status != sys::GGML_STATUS_SUCCESS {
            // SAFETY: valid backend.
            unsafe { sys::ggml_backend_synchronize(backend) };
            return Err(DeviceError::Compute(self.name.clone()));
        }
        if p.out_words > 0 {
            if self.stage_down.len() < p.out_words {
                self.stage_down.resize(p.out_words, 0.0);
            }
            // SAFETY: the span covers the outputs' `out_words` words of the io buffer, and the
            // staging buffer has that room until the synchronize below.
            unsafe {
                sys::ggml_backend_tensor_get_async(backend, p.out_span, self.stage_down.as_mut_ptr() as *mut _, 0, p.out_words * 4);
                sys::ggml_backend_synchronize(backend);
            }
            self.bytes_down += (p.out_words * 4) as u64;
            self.copies_down += 1;
        } else {
            // SAFETY: valid backend; waits for the upload and the graph.
            unsafe { sys::ggml_backend_synchronize(backend) };
        }
        self.runs += 1;
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
        let dist = plan.distance.as_ref().filter(|_| !runs.is_empty());
        // The graph's structure: shapes, ranges, index counts, bucket runs, flow rows.
        let mut sig: Vec<i64> = vec![1, n_kv as i64, n_tok as i64, n_head as i64, plan.gather.len() as i64, plan.ranges.len() as i64];
        sig.extend(plan.ranges.iter().flat_map(|&(i0, i1)| [i0 as i64, i1 as i64]));
        match dist {
            Some(d) => sig.extend([d.cells_desc.len() as i64, d.offset as i64, runs.len() as i64]),
            None => sig.push(-1),
        }
        sig.extend(runs.iter().flat_map(|r| [r.e0 as i64, r.e1 as i64, r.single as i64, r.bucket_end as i64]));
        sig.push(plan.flow.as_ref().map_or(-1, |f| f.pred_from as i64));
        let mut uploads = vec![Upload::I32(plan.gather)];
        if let Some(d) = dist {
            uploads.push(Upload::I32(d.cells_desc));
        }
        if let Some(f) = &plan.flow {
            uploads.push(Upload::F32(f.scale));
        }
        let n_tensors = 64 + plan.ranges.len() * 8 + runs.len() * 2;
        let build = |c: *mut sys::ggml_context| {
            let (ne_kv, ne_tok, ne_head) = (n_kv as i64, n_tok as i64, n_head as i64);
            // SAFETY: every tensor below is created in `c` from tensors of `c` (or the aliased
            // scheduler memory), with shapes and view extents checked above; nothing is
            // computed until the graph runs.
            unsafe {
                let mut b = Built { graph: sys::ggml_new_graph(c), alias: alias(c, t, n)?, inputs: vec![], outputs: vec![] };
                let input = |ty: sys::ggml_type, ne0: i64, ne1: i64, ne2: i64| {
                    let t = sys::ggml_new_tensor_3d(c, ty, ne0, ne1, ne2);
                    sys::ggml_set_input(t);
                    t
                };
                // Means over the rows of a contiguous tensor (`k` rows at a time), with ggml's
                // average pooling: it reads the tensor where it is, where row sums would first
                // need a transposed copy (twice the traffic, and one more kernel).
                let pool_rows = |x: *mut sys::ggml_tensor, k: usize| sys::ggml_pool_2d(c, x, sys::GGML_OP_POOL_AVG, 1, k as i32, 1, k as i32, 0.0, 0.0);
                // Mean over the heads of a contiguous [n_kv, n_tok, n_head] tensor, as [n_kv, n_tok].
                let head_mean = |x: *mut sys::ggml_tensor| {
                    let m = pool_rows(sys::ggml_reshape_2d(c, x, ne_kv * ne_tok, ne_head), n_head);
                    sys::ggml_reshape_2d(c, m, ne_kv, ne_tok)
                };
                let a = b.alias;
                let a3 = sys::ggml_reshape_3d(c, a, ne_kv, ne_tok, ne_head);
                // The gathered elements (each query's own cell).
                let idx = input(sys::GGML_TYPE_I32, plan.gather.len() as i64, 1, 1);
                b.inputs.push(idx);
                b.output(sys::ggml_get_rows(c, sys::ggml_reshape_2d(c, a, 1, n as i64), sys::ggml_reshape_1d(c, idx, plan.gather.len() as i64)));
                // Rows `r0..r0 + k` of a 3-d tensor, copied contiguous.
                let rows_of = |x: *mut sys::ggml_tensor, r0: usize, k: usize| sys::ggml_cont(c, sys::ggml_view_3d(c, x, ne_kv, k as i64, ne_head, (*x).nb[1], (*x).nb[2], r0 * (*x).nb[1]));
                // The mean of a contiguous tensor's `k` rows (a single row is its own mean).
                let mean = |x: *mut sys::ggml_tensor, k: usize| if k == 1 { x } else { pool_rows(x, k) };
                // Column sums of each range, as the means of `col_split`'s parts. A range other
                // than all rows is copied first (pooling reads contiguous rows), and so is a
                // single row (an output must not be the aliased tensor itself).
                for &(i0, i1) in plan.ranges.iter().filter(|r| r.1 > r.0) {
                    let len = i1 - i0;
                    let src = if len == n_tok && len > 1 { a3 } else { rows_of(a3, i0, len) };
                    let (main, rest) = col_split(len);
                    b.output(match main > 2 * COL_BLOCK {
                        // Blocks of COL_BLOCK rows, then the blocks' means: enough threads for
                        // a GPU in the first pool, few rows left for the second.
                        true => pool_rows(pool_rows(src, COL_BLOCK), main / COL_BLOCK),
                        false => mean(src, main),
                    });
                    if rest > 0 {
                        b.output(mean(rows_of(src, main, rest), rest));
                    }
                }
                if let Some(d) = dist {
                    let p = d.cells_desc.len() as i64;
                    // Head mean with cells as rows [n_tok, n_kv], plus a zero row at n_kv.
                    let mt = sys::ggml_pad(c, sys::ggml_cont(c, sys::ggml_transpose(c, head_mean(a3))), 0, 1, 0, 0);
                    let rows = input(sys::GGML_TYPE_I32, p, 1, 1);
                    b.inputs.push(rows);
                    // Positions p_hi, p_hi - 1, ... as columns of each query's row, zero-padded.
                    let g = sys::ggml_get_rows(c, mt, sys::ggml_reshape_1d(c, rows, p));
                    let x = sys::ggml_pad(c, sys::ggml_cont(c, sys::ggml_transpose(c, g)), (p - 1) as i32, 0, 0, 0);
                    // Skewed rows: element e of row i is query i's attention at distance e.
                    let nb1 = ((2 * p - 2) * 4) as usize;
                    let skew = |e0: usize, len: usize| sys::ggml_view_2d(c, x, len as i64, ne_tok, nb1, (d.offset + e0) * 4);
                    for r in &runs {
                        b.output(match r.single {
                            true => sys::ggml_cont(c, skew(r.e0, r.e1 - r.e0)),
                            false => sys::ggml_sum_rows(c, skew(r.e0, r.e1 - r.e0)),
                        });
                    }
                }
                if let Some(f) = &plan.flow {
                    let s = input(sys::GGML_TYPE_F32, ne_kv, 1, ne_head);
                    b.inputs.push(s);
                    // The head mean: the sum is n_head times it (applied when read).
                    let fm = head_mean(sys::ggml_mul(c, a3, s));
                    b.output(sys::ggml_sum_rows(c, fm));
                    if f.pred_from < n_tok {
                        let k = (n_tok - f.pred_from) as i64;
                        b.output(sys::ggml_cont(c, sys::ggml_view_2d(c, fm, ne_kv, k, (*fm).nb[1], f.pred_from * (*fm).nb[1])));
                    }
                }
                Ok(b)
            }
        };
        let k = self.exec(t, sig, n_tensors, build, &uploads)?;
        let mut it = self.outputs(k);
        let mut next = || it.next().unwrap_or_default();
        let mut out = AttnOut { gathered: next().to_vec(), ..Default::default() };
        // Sums from the parts' means.
        out.cols = plan
            .ranges
            .iter()
            .map(|r| {
                if r.1 == r.0 {
                    return vec![];
                }
                let (main, rest) = col_split(r.1 - r.0);
                let mut v: Vec<f32> = next().iter().map(|&x| x * main as f32).collect();
                if rest > 0 {
                    v.iter_mut().zip(next()).for_each(|(v, &x)| *v += x * rest as f32);
                }
                v
            })
            .collect();
        if let Some(d) = &plan.distance {
            let nb = d.n_buckets;
            out.distance = vec![0.0; nb * n_tok];
            for r in &runs {
                let v = next();
                let n_cols = if r.single { r.e1 - r.e0 } else { 1 };
                let b0 = r.bucket_end - n_cols;
                for i in 0..n_tok {
                    out.distance[i * nb + b0..i * nb + b0 + n_cols].copy_from_slice(&v[i * n_cols..(i + 1) * n_cols]);
                }
            }
        }
        if let Some(f) = &plan.flow {
            let heads = n_head as f32;
            out.flow_rows = next().iter().map(|&x| x * heads).collect();
            if f.pred_from < n_tok {
                out.flow_pred = next().iter().map(|&x| x * heads).collect();
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
        let sig = vec![2, w as i64, n_rows as i64, stride as i64, nd as i64, plan.n_heads as i64];
        let uploads: Vec<Upload> = if nd > 0 { vec![Upload::I32(&dims_idx)] } else { vec![] };
        let build = |c: *mut sys::ggml_context| {
            let (ne_w, ne_r) = (w as i64, n_rows as i64);
            // SAFETY: tensors of `c` and the aliased scheduler memory, extents checked above;
            // every view below lies inside the tensor it views (checked again when prepared).
            unsafe {
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
                let mut b = Built { graph: sys::ggml_new_graph(c), alias: x, inputs: vec![], outputs: vec![] };
                for o in [sys::ggml_sum_rows(c, sq), sys::ggml_get_rows(c, a3, top_i), sys::ggml_cont(c, top_i), sys::ggml_get_rows(c, a3, med_i)] {
                    b.output(o);
                }
                if plan.n_heads > 0 {
                    b.output(sys::ggml_sum_rows(c, sys::ggml_reshape_2d(c, sq, (w / plan.n_heads) as i64, (plan.n_heads * n_rows) as i64)));
                }
                if nd > 0 {
                    let di = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_I32, nd as i64, ne_r);
                    sys::ggml_set_input(di);
                    b.inputs.push(di);
                    b.output(sys::ggml_get_rows(c, sys::ggml_reshape_3d(c, x2, 1, ne_w, ne_r), di));
                }
                Ok(b)
            }
        };
        let k = self.exec(t, sig, 32, build, &uploads)?;
        let mut it = self.outputs(k);
        let mut next = || it.next().unwrap_or_default().to_vec();
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
        let sig = vec![3, n_kv as i64, n_tok as i64, stride as i64];
        let uploads = [Upload::F32(plan.cell_pos), Upload::F32(plan.lo), Upload::F32(plan.q), Upload::F32(&index)];
        let build = |c: *mut sys::ggml_context| {
            let (ne_kv, ne_tok) = (n_kv as i64, n_tok as i64);
            // SAFETY: tensors of `c` and the aliased mask memory, extents checked above.
            unsafe {
                let mut b = Built { graph: sys::ggml_new_graph(c), alias: alias(c, mask, extent)?, inputs: vec![], outputs: vec![] };
                let m = sys::ggml_view_2d(c, b.alias, ne_kv, ne_tok, stride * 4, 0);
                let input = |ne0: i64, ne1: i64| {
                    let t = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, ne0, ne1);
                    sys::ggml_set_input(t);
                    t
                };
                let (cp, lo, q, k) = (input(ne_kv, 1), input(1, ne_tok), input(1, ne_tok), input(ne_tok, 1));
                b.inputs = vec![cp, lo, q, k];
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
                for o in [sys::ggml_sum_rows(c, unexplained), sys::ggml_sum_rows(c, hidden), sys::ggml_sum_rows(c, ut), sys::ggml_sum_rows(c, sys::ggml_mul(c, ut, k))] {
                    b.output(o);
                }
                Ok(b)
            }
        };
        let k = self.exec(mask, sig, 48, build, &uploads)?;
        let mut it = self.outputs(k);
        let mut next = || it.next().unwrap_or_default().to_vec();
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
        let sig = vec![4, n_kv as i64, n_tok as i64, n_head as i64, g as i64, plan.window.to_bits() as i64];
        let uploads = [Upload::F32(plan.cell_pos), Upload::F32(plan.query_pos), Upload::F32(plan.hidden)];
        let build = |c: *mut sys::ggml_context| {
            let (ne_kv, ne_tok, ne_g) = (n_kv as i64, n_tok as i64, g as i64);
            // SAFETY: tensors of `c` and the aliased scheduler memory, shapes checked above.
            unsafe {
                let mut b = Built { graph: sys::ggml_new_graph(c), alias: alias(c, t, n_kv * n_tok * n_head)?, inputs: vec![], outputs: vec![] };
                let kq4 = sys::ggml_reshape_4d(c, b.alias, ne_kv, ne_tok, (n_head / g) as i64, ne_g);
                let cp = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, ne_kv, 1);
                let qp = sys::ggml_new_tensor_2d(c, sys::GGML_TYPE_F32, 1, ne_tok);
                let hid = sys::ggml_new_tensor_4d(c, sys::GGML_TYPE_F32, ne_kv, 1, 1, ne_g);
                b.inputs = vec![cp, qp, hid];
                for &x in &b.inputs {
                    sys::ggml_set_input(x);
                }
                // dist[c, i] = q_i - p_c; visible where 0 < dist < window.
                let dist = sys::ggml_sub(c, sys::ggml_repeat_4d(c, qp, ne_kv, ne_tok, 1, 1), cp);
                let vis = sys::ggml_mul(c, sys::ggml_step(c, dist), sys::ggml_step(c, sys::ggml_scale_bias(c, dist, -1.0, plan.window)));
                let hide = sys::ggml_mul(c, sys::ggml_repeat_4d(c, vis, ne_kv, ne_tok, 1, ne_g), hid);
                let log_keep = sys::ggml_log(c, sys::ggml_scale_bias(c, hide, -1.0, 1.0));
                sys::ggml_build_forward_expand(b.graph, sys::ggml_add_inplace(c, kq4, log_keep));
                Ok(b)
            }
        };
        self.exec(t, sig, 32, build, &uploads).map(|_| ())
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

/// Rows per block in the first of the two pools that average many rows.
const COL_BLOCK: usize = 16;

/// How the column sums over `len` rows are computed: as the mean of the first `main` rows
/// (one pool, or two when `main > 2 * COL_BLOCK`) and, when `rest > 0`, the mean of the
/// `rest` rows after them.
fn col_split(len: usize) -> (usize, usize) {
    match len <= 2 * COL_BLOCK {
        true => (len, 0),
        false => (len - len % COL_BLOCK, len % COL_BLOCK),
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
        // SAFETY: created in `for_tensor` (or grown), freed once: graphs' metadata, then the
        // allocators and buffers, then their backend.
        unsafe {
            for slot in self.slots.drain(..) {
                drop(slot.prepared);
                for a in std::iter::once(slot.galloc).chain(slot.retired) {
                    sys::ggml_gallocr_free(a.as_ptr());
                }
                for b in slot.io.into_iter().chain(slot.io_retired) {
                    sys::ggml_backend_buffer_free(b.as_ptr());
                }
            }
            sys::ggml_gallocr_free(self.measure.as_ptr());
            sys::ggml_backend_free(self.backend.as_ptr());
        }
    }
}

/// A compute device as ggml sees it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct DeviceInfo {
    /// ggml's device name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// `cpu`, `gpu`, `igpu` or `accel`.
    pub kind: String,
    /// Total memory (MiB).
    pub memory_total_mb: u64,
    /// `HOST:PORT` of the RPC server serving it; absent for a local device.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// `NAME (description)` of a device, as in the model's device list.
pub(super) fn describe(d: sys::ggml_backend_dev_t) -> String {
    // SAFETY: a registered device; its name and description are static strings.
    unsafe { format!("{} ({})", cstr(sys::ggml_backend_dev_name(d)), cstr(sys::ggml_backend_dev_description(d))) }
}

/// The local GPUs llama.cpp offloads to by default: every discrete GPU (one per device id),
/// or the integrated GPUs of one backend when there is none; RPC devices are not local.
pub(super) fn local_gpus() -> Vec<sys::ggml_backend_dev_t> {
    let (mut gpus, mut igpus): (Vec<sys::ggml_backend_dev_t>, Vec<sys::ggml_backend_dev_t>) = (vec![], vec![]);
    let id = |d: sys::ggml_backend_dev_t| {
        // SAFETY: a registered device; `props` is plain data it fills, its id a static string or null.
        unsafe {
            let mut props: sys::ggml_backend_dev_props = std::mem::zeroed();
            sys::ggml_backend_dev_get_props(d, &mut props);
            (!props.device_id.is_null()).then(|| cstr(props.device_id))
        }
    };
    // SAFETY: registry queries; indices below the count are valid.
    let all: Vec<sys::ggml_backend_dev_t> = unsafe { (0..sys::ggml_backend_dev_count()).map(|i| sys::ggml_backend_dev_get(i)).collect() };
    for d in all {
        if super::rpc::endpoint_of(d).is_some() {
            continue;
        }
        // SAFETY: a registered device.
        let (kind, reg) = unsafe { (sys::ggml_backend_dev_type(d), sys::ggml_backend_dev_backend_reg(d)) };
        if kind == sys::GGML_BACKEND_DEVICE_TYPE_GPU {
            let same = id(d).is_some_and(|me| gpus.iter().any(|&g| id(g).as_ref() == Some(&me)));
            if !same {
                gpus.push(d);
            }
        } else if kind == sys::GGML_BACKEND_DEVICE_TYPE_IGPU {
            // SAFETY: as above.
            if igpus.last().map_or(true, |&g| unsafe { sys::ggml_backend_dev_backend_reg(g) } == reg) {
                igpus.push(d);
            }
        }
    }
    if gpus.is_empty() {
        igpus
    } else {
        gpus
    }
}

/// Every device ggml registered in this process (the CPU always; GPUs of the enabled
/// backends; the devices of the RPC servers in use).
pub fn devices() -> Vec<DeviceInfo> {
    super::init_backend();
    // SAFETY: registry queries; indices below the count are valid.
    unsafe {
        (0..sys::ggml_backend_dev_count())
            .map(|i| sys::ggml_backend_dev_get(i))
            .filter(|&d| super::rpc::usable(d))
            .map(|d| {
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
                    endpoint: super::rpc::endpoint_of(d),
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
                let mut dc = DeviceCompute::for_tensor(view, 2).unwrap();
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
        on_cpu_tensors(&[([ne0, ne1, 1], data)], |v| f(&v[0]))
    }

    /// `f` over tensors `[ne0, ne1, ne2]` of the CPU backend holding the data, each in a
    /// buffer of its own (so at its own address).
    fn on_cpu_tensors<T>(specs: &[([usize; 3], &[f32])], f: impl FnOnce(&[TensorView]) -> T) -> T {
        super::super::init_backend();
        let ctx = GraphCtx::new(specs.len());
        let mut bufs = vec![];
        let mut views = vec![];
        // SAFETY: a CPU buffer sized for each tensor, placed at its base and filled; the views
        // (and whatever `f` made of them) are gone before the buffers are freed.
        unsafe {
            let buft = sys::ggml_backend_dev_buffer_type(sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU));
            for &([ne0, ne1, ne2], data) in specs {
                assert_eq!(data.len(), ne0 * ne1 * ne2);
                let t = sys::ggml_new_tensor_3d(ctx.ptr(), sys::GGML_TYPE_F32, ne0 as i64, ne1 as i64, ne2 as i64);
                let buf = sys::ggml_backend_buft_alloc_buffer(buft, sys::ggml_nbytes(t) + 256);
                assert!(!buf.is_null());
                assert_eq!(sys::ggml_backend_tensor_alloc(buf, t, sys::ggml_backend_buffer_get_base(buf)), sys::GGML_STATUS_SUCCESS);
                sys::ggml_backend_tensor_set(t, data.as_ptr() as *const _, 0, data.len() * 4);
                bufs.push(buf);
                views.push(TensorView::new(NonNull::new(t).unwrap()));
            }
            let r = f(&views);
            drop(views);
            for b in bufs {
                sys::ggml_backend_buffer_free(b);
            }
            r
        }
    }

    /// Column sums (pooled means of blocks, the blocks' means and the rows left over) and the
    /// head-mean flow equal sums computed directly, for ranges of every kind: all rows and a
    /// part; one row, up to two blocks, more, with 0, 1 and several rows left over; and a
    /// one-query micro-batch (a decode step).
    #[test]
    fn pooled_column_sums_equal_direct_sums() {
        let mut rng = crate::rng::SplitMix64(11);
        for (n_kv, n_tok, ranges) in [
            (7usize, 70usize, vec![(0usize, 70usize), (5, 70), (3, 40), (10, 30), (69, 70), (0, 48), (2, 35), (0, 0)]),
            (9, 33, vec![(0, 33), (0, 32), (1, 33)]),
            (5, 1, vec![(0, 1)]),
        ] {
            let n_head = 3;
            let data: Vec<f32> = (0..n_kv * n_tok * n_head).map(|_| rng.gauss() as f32).collect();
            let scale: Vec<f32> = (0..n_kv * n_head).map(|_| rng.gauss() as f32).collect();
            let at = |c: usize, i: usize, h: usize| data[c + n_kv * (i + n_tok * h)] as f64;
            let gather = vec![0i32];
            let plan = AttnPlan { ranges: &ranges, gather: &gather, distance: None, flow: Some(FlowPlan { scale: &scale, pred_from: 0 }) };
            let out = on_cpu_tensors(&[([n_kv, n_tok, n_head], &data[..])], |v| DeviceCompute::for_tensor(&v[0], 2).unwrap().reduce_attention(&v[0], &plan).unwrap());
            let close = |got: f32, want: f64, what: &str| assert!((got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()), "{what}: {got} vs {want}");
            for (w, &(i0, i1)) in ranges.iter().enumerate() {
                assert_eq!(out.cols[w].len(), if i1 > i0 { n_kv * n_head } else { 0 }, "range {w}");
                for h in 0..n_head {
                    for cell in 0..n_kv {
                        if i1 > i0 {
                            close(out.cols[w][cell + n_kv * h], (i0..i1).map(|i| at(cell, i, h)).sum(), &format!("{n_tok} rows, range {i0}..{i1}, cell {cell}, head {h}"));
                        }
                    }
                }
            }
            for i in 0..n_tok {
                let row: Vec<f64> = (0..n_kv).map(|cell| (0..n_head).map(|h| at(cell, i, h) * scale[h * n_kv + cell] as f64).sum()).collect();
                close(out.flow_rows[i], row.iter().sum(), &format!("flow row {i}"));
                for (cell, &want) in row.iter().enumerate() {
                    close(out.flow_pred[cell + n_kv * i], want, &format!("flow of query {i}, cell {cell}"));
                }
            }
        }
    }

    /// A graph built for one tensor and run again over another (the next layer) reads the
    /// other: results equal those of a graph built for it alone. Shapes alternate and a third
    /// one replaces the least recently run of two slots; inputs already on the device are not
    /// uploaded again.
    #[test]
    fn reused_graphs_read_each_tensor() {
        // [n_kv, n_tok, n_head]: two tensors of the first shape, one of each other.
        let shapes = [[80usize, 4, 3], [100, 5, 3], [80, 4, 3], [70, 3, 3]];
        let mut rng = crate::rng::SplitMix64(7);
        let datas: Vec<Vec<f32>> = shapes.iter().map(|s| (0..s.iter().product::<usize>()).map(|_| rng.gauss() as f32).collect()).collect();
        let scales: Vec<Vec<f32>> = shapes.iter().map(|s| (0..s[0] * s[2]).map(|_| rng.gauss() as f32).collect()).collect();
        // Cells hold positions 0..n_kv, the queries are the last n_tok of them.
        let plan_parts = |[n_kv, n_tok, n_head]: [usize; 3]| {
            let gather: Vec<i32> = (0..n_head).flat_map(|h| (0..n_tok).map(move |i| (n_kv - n_tok + i + n_kv * (i + n_tok * h)) as i32)).collect();
            let cells_desc: Vec<i32> = (0..n_kv).rev().map(|c| c as i32).collect();
            (gather, cells_desc, vec![(0, n_tok), (1, n_tok), (0, 0), (n_tok - 1, n_tok)])
        };
        let bucket = |d: usize| distance_bucket(d);
        let reduce = |dc: &mut DeviceCompute, v: &TensorView, k: usize| {
            let (gather, cells_desc, ranges) = plan_parts(shapes[k]);
            let [n_kv, n_tok, _] = shapes[k];
            let distance = Some(DistPlan { cells_desc: &cells_desc, offset: n_tok - 1, n_buckets: distance_bucket(n_kv) + 1, bucket: &bucket });
            let plan = AttnPlan { ranges: &ranges, gather: &gather, distance, flow: Some(FlowPlan { scale: &scales[k], pred_from: 1 }) };
            dc.reduce_attention(v, &plan).unwrap()
        };
        let specs: Vec<([usize; 3], &[f32])> = shapes.iter().zip(&datas).map(|(&s, d)| (s, &d[..])).collect();
        on_cpu_tensors(&specs, |views| {
            let mut shared = DeviceCompute::for_tensor(&views[0], 2).unwrap();
            // Built for 0, then 1; 2 reuses 0's graph; 3 replaces 1's; 0 again reuses; 1 rebuilds.
            for (step, &k) in [0usize, 1, 2, 3, 0, 1].iter().enumerate() {
                let got = reduce(&mut shared, &views[k], k);
                let want = reduce(&mut DeviceCompute::for_tensor(&views[k], 2).unwrap(), &views[k], k);
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "step {step}, tensor {k}");
                assert!(got.cols[0].iter().any(|&x| x != 0.0) && got.cols[2].is_empty() && !got.distance.is_empty(), "step {step}");
                // An independent check of one number: the first column sum of head 0.
                let [n_kv, n_tok, _] = shapes[k];
                let direct: f32 = (0..n_tok).map(|i| datas[k][n_kv * i]).sum();
                assert!((got.cols[0][0] - direct).abs() < 1e-5, "step {step}: {} vs {direct}", got.cols[0][0]);
            }
            assert_eq!((shared.builds, shared.runs), (4, 6));
        });
        // Activations: the same dims on every run, so their indices are uploaded once.
        let data: Vec<f32> = (0..3 * 4 * 6).map(|i| (i as f32 * 0.37).sin()).collect();
        on_cpu_tensors(&[([6, 4, 1], &data[..24]), ([6, 4, 1], &data[24..48]), ([6, 4, 1], &data[48..])], |views| {
            let mut dc = DeviceCompute::for_tensor(&views[0], 2).unwrap();
            let plan = ActPlan { width: 6, n_rows: 4, row_stride: 6, dims: &[1, 4], n_heads: 2 };
            for (k, v) in views.iter().enumerate() {
                let got = dc.reduce_activation(v, &plan).unwrap();
                let want = DeviceCompute::for_tensor(v, 2).unwrap().reduce_activation(v, &plan).unwrap();
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "tensor {k}");
                assert_eq!(got.values[0], data[24 * k + 1], "tensor {k}");
            }
            assert_eq!((dc.builds, dc.runs, dc.copies_up, dc.copies_down), (1, 3, 1, 3));
        });
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
            let out = on_cpu_tensor(n_kv, n, &data, |view| DeviceCompute::for_tensor(view, 2).unwrap().check_mask(view, &MaskPlan { cell_pos: &cell_pos, lo: &lo, q: &q }).unwrap());
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
