//! The only module with `unsafe`: one safe wrapper per llama.cpp object.
//!
//! Every wrapper holds a `NonNull` pointer and frees it in `Drop`; every fallible
//! operation has its own error enum. The eval callback trampoline lives in
//! `callback`; it catches panics so that none crosses into C.

mod backend;
mod batch;
mod callback;
mod context;
mod device;
mod grad;
mod model;
mod quantize;
mod rpc;
mod state;
mod tensor;

pub use backend::{init_backend, last_llama_error, set_verbose};
pub use batch::{Batch, BatchError};
pub use callback::{panic_message, EvalHook, HookError, Hooks, NodeInfo};
pub use context::{interrupted, request_interrupt, Context, ContextError, ContextParams, DecodeError, FlashAttn, KvType, StateError};
pub use grad::{backward_gaps, GradContext, GradError};
pub use device::{devices, ActOut, ActPlan, AttnOut, AttnPlan, DeviceCompute, DeviceError, DeviceInfo, DistPlan, FlowPlan, HidePlan, MaskOut, MaskPlan};
pub use model::{LoadError, Model, ModelMeta, ModelParams, RunDevice, TemplateError, TokenizeError};
pub use rpc::{add_server as rpc_add_server, forget as rpc_forget, serve_cpu as rpc_serve_cpu, set_timeout as rpc_set_timeout, RpcError, DEFAULT_TIMEOUT as RPC_DEFAULT_TIMEOUT, PROTOCOL as RPC_PROTOCOL};
pub use quantize::{quant_type, quantize, QuantizeError, QUANT_TYPES};
pub use tensor::{TensorView, ViewError};
