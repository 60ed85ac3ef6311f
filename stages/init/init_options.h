#pragma once
// Options of the init stage (job.yaml section `init:`).
#include <string>

namespace sd::stages {

struct InitOptions {
  // CLIP merges file for a tokenizer/ without vocabulary files; "auto":
  // $SD_CLIP_BPE, else open_clip's copy in .venv or the system Python.
  std::string clip_bpe = "auto";
};

}  // namespace sd::stages
