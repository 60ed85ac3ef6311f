#pragma once
// Small configs that several C++ tests build models and schedulers from.
#include <nlohmann/json.hpp>

#include "sd/io/json_config.h"

namespace sd::testdata {

// A two-level UNet, 32/64 wide, cross-attention 32: loads and runs in milliseconds.
inline nlohmann::json TinyUNet() {
  return {{"block_out_channels", {32, 64}},
          {"down_block_types", {"CrossAttnDownBlock2D", "DownBlock2D"}},
          {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D"}},
          {"cross_attention_dim", 32},
          {"attention_head_dim", {2, 4}},
          {"norm_num_groups", 16},
          {"layers_per_block", 1}};
}

// SD1.5's scheduler_config.json (PNDM, scaled-linear betas), with `extra` on top.
inline JsonConfig Sd15Scheduler(const nlohmann::json& extra = nlohmann::json::object()) {
  nlohmann::json j = {{"_class_name", "PNDMScheduler"},
                      {"beta_start", 0.00085},
                      {"beta_end", 0.012},
                      {"beta_schedule", "scaled_linear"},
                      {"num_train_timesteps", 1000},
                      {"set_alpha_to_one", false},
                      {"skip_prk_steps", true},
                      {"steps_offset", 1},
                      {"clip_sample", false}};
  j.update(extra);
  return JsonConfig::FromJson(j, "scheduler_config.json");
}

}  // namespace sd::testdata
