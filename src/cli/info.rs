use super::{common, InfoArgs};
use crate::capture::sliding_window_layers;

pub fn run(a: InfoArgs) -> anyhow::Result<()> {
    let model = common::load_model(&a.model)?;
    let meta = model.meta();
    let swa = sliding_window_layers(&model).map_err(|e| anyhow::anyhow!(e))?;
    if a.json {
        let mut v = serde_json::to_value(&meta)?;
        v["sliding_window_layers"] = serde_json::json!(swa);
        v["profile"] = serde_json::to_value(model.profile().map_err(|e| anyhow::anyhow!(e))?)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file            {}", meta.file);
    println!("name            {}", meta.name);
    println!("architecture    {}", meta.architecture);
    println!("description     {}", meta.description);
    println!("parameters      {}", meta.n_params);
    println!("layers          {}", meta.n_layer);
    let profile = model.profile().map_err(|e| anyhow::anyhow!(e))?;
    let att = profile.attention_layers();
    let kv: std::collections::BTreeSet<usize> = att.iter().map(|&l| profile.n_head_kv(l)).collect();
    let kv: Vec<String> = kv.iter().map(|k| k.to_string()).collect();
    println!("heads           {} (KV heads {}, in the attention layers)", meta.n_head, if kv.is_empty() { "none".into() } else { kv.join("/") });
    println!("embedding       {} (head size {})", meta.n_embd, meta.head_dim);
    println!("trained context {}", meta.n_ctx_train);
    let swa_txt = if swa.is_empty() { "none".to_string() } else { format!("{:?} (window {})", swa, meta.n_swa) };
    println!("sliding window  {swa_txt}");
    println!("vocabulary      {}", meta.n_vocab);
    println!("BOS / EOS       {:?} / {:?} (BOS added: {})", meta.bos, meta.eos, meta.add_bos);
    println!("chat template   {}", if meta.chat_template.is_some() { "yes" } else { "no" });
    println!("runs on         {} ({} of {} layers offloaded from the CPU)", meta.device.backend, meta.device.gpu_layers, meta.device.layers);
    let devs: Vec<String> = meta.device.devices.iter().map(|d| format!("{} [{}] {}", d.name, d.kind, d.description)).collect();
    println!("ggml devices    {}", devs.join("; "));
    println!("attention       {} of {} layers{}{}", att.len(), meta.n_layer, if profile.has_recurrent_layers() { " (the others are recurrent or attention-free)" } else { "" }, if profile.has_sinks() { "; learned sink logits in the softmax" } else { "" });
    println!("layer  attention       heads  kv  head  keys node                          values node          activation node");
    for l in &profile.layers {
        let (kind, h, k, d) = match &l.attention {
            Some(a) => (a.window.map_or("full".to_string(), |w| format!("window {w}")), a.n_head, a.n_head_kv, a.head_dim),
            None => ("none".to_string(), 0, 0, 0),
        };
        let n = |x: &Option<crate::capture::profile::NodeRef>| x.as_ref().map_or("-".to_string(), |n| n.to_string());
        println!("{:<6} {kind:<15} {h:<6} {k:<3} {d:<5} {:<34} {:<20} {}", l.layer, n(&l.keys) + if l.keys_fused { " (fused)" } else { "" }, n(&l.values), n(&l.activation));
    }
    Ok(())
}
