//! A read-only view of a ggml tensor handed to the eval callback.

use std::ffi::CStr;
use std::marker::PhantomData;
use std::ptr::NonNull;

use llama_cpp_sys_2 as sys;

#[derive(Debug, thiserror::Error)]
/// Why a tensor could not be read as floats.
pub enum ViewError {
    #[error("tensor {name} has type {ty}, expected f32")]
    /// Not f32.
    NotF32 {
        /// Tensor name.
        name: String,
        /// Its type.
        ty: String,
    },
    #[error("tensor {0} has no data buffer")]
    /// No data on the host.
    NoData(String),
    #[error("cannot write {got} bytes into tensor {name} of {want} bytes")]
    /// Fewer elements than the shape says.
    Size {
        /// Tensor name.
        name: String,
        /// Elements present.
        got: usize,
        /// Elements the shape needs.
        want: usize,
    },
}

/// A tensor as the scheduler computed it. Valid only inside the callback that received it:
/// the memory is reused by later nodes, so copy or reduce before returning.
pub struct TensorView<'a> {
    ptr: NonNull<sys::ggml_tensor>,
    _life: PhantomData<&'a sys::ggml_tensor>,
}

impl<'a> TensorView<'a> {
    /// # Safety
    /// `ptr` must point to a live tensor for the whole lifetime `'a`.
    pub(crate) unsafe fn new(ptr: NonNull<sys::ggml_tensor>) -> TensorView<'a> {
        TensorView { ptr, _life: PhantomData }
    }

    fn t(&self) -> &sys::ggml_tensor {
        // SAFETY: the constructor's contract keeps the tensor alive for `'a`.
        unsafe { self.ptr.as_ref() }
    }

    /// Node name.
    pub fn name(&self) -> &str {
        // SAFETY: ggml names are NUL-terminated within the fixed 64-byte array.
        let c = unsafe { CStr::from_ptr(self.t().name.as_ptr()) };
        c.to_str().unwrap_or("")
    }

    /// ggml op name.
    pub fn op_name(&self) -> &'static str {
        // SAFETY: ggml_op_name returns a static string for any op value.
        let p = unsafe { sys::ggml_op_name(self.t().op) };
        if p.is_null() {
            return "";
        }
        // SAFETY: static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("")
    }

    /// The op as `ggml_op_desc` names it: the unary or gated-linear function for `UNARY` and
    /// `GLU` nodes (`SILU`, `SWIGLU`, `GEGLU`), else the op name.
    pub fn op_desc(&self) -> &'static str {
        // SAFETY: a live tensor; ggml_op_desc returns a static string for any node.
        let p = unsafe { sys::ggml_op_desc(self.ptr.as_ptr()) };
        if p.is_null() {
            return "";
        }
        // SAFETY: static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("")
    }

    /// The op is a softmax.
    pub fn is_softmax(&self) -> bool {
        self.t().op == sys::GGML_OP_SOFT_MAX
    }

    /// Shape, ggml order.
    pub fn ne(&self) -> [usize; 4] {
        self.t().ne.map(|x| x.max(0) as usize)
    }

    /// Strides in bytes.
    pub fn nb(&self) -> [usize; 4] {
        self.t().nb
    }

    /// ggml type name.
    pub fn type_name(&self) -> &'static str {
        // SAFETY: ggml_type_name returns a static string for any type value.
        let p = unsafe { sys::ggml_type_name(self.t().type_) };
        if p.is_null() {
            return "?";
        }
        // SAFETY: static NUL-terminated string.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
    }

    /// The tensor holds f32.
    pub fn is_f32(&self) -> bool {
        self.t().type_ == sys::GGML_TYPE_F32
    }

    /// Whether the data lives in host memory (readable without a copy).
    pub fn is_host(&self) -> bool {
        let buf = self.t().buffer;
        // SAFETY: a non-null buffer pointer belongs to the scheduler and is live during the callback.
        !buf.is_null() && unsafe { sys::ggml_backend_buffer_is_host(buf) }
    }

    /// Source tensor `i` (for `kq_soft_max`, 0 = the scores, 1 = the mask).
    pub fn src(&self, i: usize) -> Option<TensorView<'a>> {
        let p = *self.t().src.get(i)?;
        // SAFETY: sources of a computed node are live while the node is (same graph).
        NonNull::new(p).map(|ptr| unsafe { TensorView::new(ptr) })
    }

    /// The raw tensor, for the device graphs of this module (valid while the view is).
    pub(crate) fn raw(&self) -> *mut sys::ggml_tensor {
        self.ptr.as_ptr()
    }

    /// Bytes spanned by the tensor's data (`ggml_nbytes`).
    pub fn nbytes(&self) -> usize {
        // SAFETY: valid tensor pointer.
        unsafe { sys::ggml_nbytes(self.ptr.as_ptr()) }
    }

    /// Stable identity of the tensor within one graph (used to group layers sharing an input).
    pub fn id(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// The tensor's bytes as f32, spanning all strides (`ggml_nbytes / 4` values). Host data is
    /// borrowed in place; device data is copied into `scratch`, which is reused between calls.
    pub fn f32_data<'s>(&'s self, scratch: &'s mut Vec<f32>) -> Result<&'s [f32], ViewError> {
        if !self.is_f32() {
            return Err(ViewError::NotF32 { name: self.name().into(), ty: self.type_name().into() });
        }
        let t = self.t();
        let nbytes = self.nbytes();
        let n = nbytes / 4;
        if t.data.is_null() || t.buffer.is_null() && t.view_src.is_null() {
            return Err(ViewError::NoData(self.name().into()));
        }
        if self.is_host() {
            // SAFETY: host memory of `nbytes` bytes, f32-aligned (ggml aligns tensor data),
            // live and unchanged for the duration of the callback.
            return Ok(unsafe { std::slice::from_raw_parts(t.data as *const f32, n) });
        }
        scratch.resize(n, 0.0);
        // SAFETY: copies `nbytes` from the tensor (any backend) into a buffer of that size.
        unsafe { sys::ggml_backend_tensor_get(self.ptr.as_ptr(), scratch.as_mut_ptr() as *mut _, 0, nbytes) };
        Ok(&scratch[..])
    }

    /// Overwrite the tensor's data (any backend) with `data`, which must span it exactly
    /// (as [`TensorView::f32_data`] returned it).
    pub fn set_f32(&self, data: &[f32]) -> Result<(), ViewError> {
        let nbytes = self.nbytes();
        if !self.is_f32() {
            return Err(ViewError::NotF32 { name: self.name().into(), ty: self.type_name().into() });
        }
        if data.len() * 4 != nbytes {
            return Err(ViewError::Size { name: self.name().into(), got: data.len() * 4, want: nbytes });
        }
        if self.t().data.is_null() || self.t().buffer.is_null() {
            return Err(ViewError::NoData(self.name().into()));
        }
        // SAFETY: `data` holds exactly the tensor's `nbytes`; the tensor is allocated and live
        // during the callback, and later nodes read it after we return.
        unsafe { sys::ggml_backend_tensor_set(self.ptr.as_ptr(), data.as_ptr() as *const _, 0, nbytes) };
        Ok(())
    }

    /// Edit the tensor's f32 data with `f`: in place in host memory, or (device memory)
    /// copied into `scratch`, edited and copied back. Returns whether it was copied.
    pub fn edit_f32(&self, scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) -> Result<bool, ViewError> {
        if let Some(d) = self.f32_data_mut() {
            f(d);
            return Ok(false);
        }
        self.f32_data(scratch)?;
        f(scratch);
        self.set_f32(scratch)?;
        Ok(true)
    }

    /// Mutable host data as f32 (for writes such as `-inf` masks). `None` when the tensor
    /// is not f32 or not in host memory.
    // The data belongs to the scheduler's buffer, not to this view: the view is a borrowed
    // handle, and the callback is the only code touching the tensor while it runs.
    #[allow(clippy::mut_from_ref)]
    pub fn f32_data_mut(&self) -> Option<&mut [f32]> {
        if !self.is_f32() || !self.is_host() || self.t().data.is_null() {
            return None;
        }
        let n = self.nbytes() / 4;
        // SAFETY: host memory owned by the scheduler, not aliased by us elsewhere during the
        // callback; later nodes read it after we return, which is the point of writing.
        Some(unsafe { std::slice::from_raw_parts_mut(self.t().data as *mut f32, n) })
    }
}
