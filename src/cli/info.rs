use super::{common, InfoArgs};
use crate::capture::sliding_window_layers;

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let meta = model.meta();
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    if a.json {
        let mut v = serde_json::to_value(&meta)?;
        v["sliding_window_layers"] = serde_json::json!(swa);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file            {}", meta.file);
    println!("name            {}", meta.name);
    println!("architecture    {}", meta.architecture);
    println!("description     {}", meta.description);
    println!("parameters      {}", meta.n_params);
    println!("layers          {}", meta.n_layer);
    println!("heads           {} (KV heads {})", meta.n_head, meta.n_head_kv);
    println!("embedding       {} (head size {})", meta.n_embd, meta.head_dim);
    println!("trained context {}", meta.n_ctx_train);
    let swa_txt = if swa.is_empty() { "none".to_string() } else { format!("{:?} (window {})", swa, meta.n_swa) };
    println!("sliding window  {swa_txt}");
    println!("vocabulary      {}", meta.n_vocab);
    println!("BOS / EOS       {:?} / {:?} (BOS added: {})", meta.bos, meta.eos, meta.add_bos);
    println!("chat template   {}", if meta.chat_template.is_some() { "yes" } else { "no" });
    println!("runs on         {} ({} of {} layers offloaded to a GPU)", meta.device.backend, meta.device.gpu_layers, meta.device.layers);
    let devs: Vec<String> = meta.device.devices.iter().map(|d| format!("{} [{}] {}", d.name, d.kind, d.description)).collect();
    println!("ggml devices    {}", devs.join("; "));
    Ok(())
}
