#pragma once
// CLIP byte-level BPE tokenizer, token-for-token the same as transformers'
// CLIPTokenizer: NFC, whitespace runs to one space, lowercase, CLIP's split
// pattern, byte-level BPE with the "</w>" end-of-word suffix.
#include <torch/torch.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace sd {

// Writes vocab.json, merges.txt and tokenizer_config.json into `out_dir` from
// OpenAI's merges file (bpe_simple_vocab_16e6.txt.gz, as open_clip ships it),
// exactly as openai/clip-vit-large-patch14's tokenizer files were made.
absl::Status WriteCLIPTokenizerFiles(const std::string& bpe_gz_path, const std::string& out_dir);

class CLIPTokenizer {
 public:
  // Reads a tokenizer/ folder: vocab.json + merges.txt, or tokenizer.json, plus
  // tokenizer_config.json / special_tokens_map.json for the special tokens.
  static absl::StatusOr<CLIPTokenizer> Load(const std::string& dir);
  static absl::StatusOr<CLIPTokenizer> FromVocabAndMerges(const std::string& vocab_json,
                                                          const std::string& merges_txt,
                                                          const std::string& origin);

  // Token ids of `text` without BOS/EOS.
  std::vector<int64_t> Encode(std::string_view text) const;
  // Stable Diffusion's call: BOS, at most max_length-2 tokens, EOS, then padding.
  std::vector<int64_t> EncodePadded(std::string_view text, int64_t max_length) const;
  // [batch, model_max_length] int64 tensor.
  torch::Tensor Tokenize(const std::vector<std::string>& texts) const;

  int64_t bos_id() const { return bos_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t model_max_length() const { return model_max_length_; }
  size_t vocab_size() const { return vocab_.size(); }

 private:
  absl::Status SetSpecialTokens(const std::string& bos, const std::string& eos,
                                const std::string& pad, const std::string& origin);
  void EncodeSegment(std::string_view text, std::vector<int64_t>& out) const;
  void Bpe(const std::string& word_bytes, std::vector<int64_t>& out) const;

  std::unordered_map<std::string, int64_t> vocab_;
  std::unordered_map<std::string, int64_t> merge_ranks_;  // "left right" -> rank
  std::vector<std::string> byte_to_unicode_;              // byte -> UTF-8 of its stand-in char
  std::vector<std::pair<std::string, int64_t>> special_;  // matched verbatim before normalization
  int64_t bos_id_ = 0, eos_id_ = 0, pad_id_ = 0, unk_id_ = 0;
  int64_t model_max_length_ = 77;
};

}  // namespace sd
