#pragma once
// Options of the export stage (job.yaml section `export:`).
#include <cstdint>

namespace sd::stages {

struct ExportOptions {
  // The UNet as shards for streaming load: export/sharded/ holds the seed's
  // unet_shard_*.safetensors + shard_index.json and, as hard links to the same
  // files, diffusers' sharded form, so from_pretrained("export/sharded") loads it.
  bool sharded = true;
  // Largest shard, MiB (a tensor larger than this gets a shard of its own). What a
  // streaming loader holds beside the model at once.
  int64_t max_shard_mb = 500;
  // export/onnx/: unet.onnx, vae_decoder.onnx, vae_encoder.onnx and
  // text_encoder.onnx, float32, IR 8 / opset 17, weights in <model>.onnx.data,
  // each checked by the onnx checker before the stage succeeds.
  bool onnx = true;
};

}  // namespace sd::stages
