#include "sd/tokenizer/clip_tokenizer.h"

#include <unicode/locid.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/ustring.h>

#include <zlib.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd {
namespace {

void AppendUtf8(UChar32 c, std::string& out) {
  icu::UnicodeString u(c);
  u.toUTF8String(out);
}

// GPT-2's reversible byte -> printable code point table.
std::vector<std::string> BytesToUnicode() {
  std::vector<int> bs;
  for (int b = '!'; b <= '~'; ++b) bs.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) bs.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) bs.push_back(b);
  std::vector<std::string> table(256);
  std::vector<bool> seen(256, false);
  for (int b : bs) seen[b] = true;
  int n = 0;
  for (int b = 0; b < 256; ++b) {
    UChar32 cp = seen[b] ? b : 256 + n++;
    AppendUtf8(cp, table[b]);
  }
  return table;
}

bool IsLetter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool IsNumber(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
bool IsSpace(UChar32 c) { return u_isUWhiteSpace(c) != 0; }

// NFC, whitespace runs -> " ", then per-code-point full lowercase (no final-sigma
// context), which is what the tokenizers library's Lowercase normalizer does.
std::vector<UChar32> Normalize(std::string_view text) {
  UErrorCode err = U_ZERO_ERROR;
  const icu::Normalizer2* nfc = icu::Normalizer2::getNFCInstance(err);
  icu::UnicodeString src = icu::UnicodeString::fromUTF8(
      icu::StringPiece(text.data(), static_cast<int32_t>(text.size())));
  icu::UnicodeString norm = U_SUCCESS(err) ? nfc->normalize(src, err) : src;
  if (U_FAILURE(err)) norm = src;
  std::vector<UChar32> out;
  bool in_space = false;
  for (int32_t i = 0; i < norm.length();) {
    UChar32 c = norm.char32At(i);
    i += U16_LENGTH(c);
    if (IsSpace(c)) {
      if (!in_space) out.push_back(' ');
      in_space = true;
      continue;
    }
    in_space = false;
    icu::UnicodeString one(c);
    one.toLower(icu::Locale::getRoot());
    for (int32_t j = 0; j < one.length();) {
      UChar32 l = one.char32At(j);
      j += U16_LENGTH(l);
      out.push_back(l);
    }
  }
  return out;
}

std::string ToUtf8(const std::vector<UChar32>& cps, size_t begin, size_t end) {
  std::string s;
  for (size_t i = begin; i < end; ++i) AppendUtf8(cps[i], s);
  return s;
}

absl::StatusOr<std::string> TokenString(const nlohmann::json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string())
    return j["content"].get<std::string>();
  return absl::InvalidArgumentError("special token must be a string or {\"content\": ...}");
}

}  // namespace

absl::StatusOr<CLIPTokenizer> CLIPTokenizer::FromVocabAndMerges(const std::string& vocab_json,
                                                                const std::string& merges_txt,
                                                                const std::string& origin) {
  CLIPTokenizer t;
  t.byte_to_unicode_ = BytesToUnicode();
  nlohmann::json v = nlohmann::json::parse(vocab_json, nullptr, false);
  if (v.is_discarded() || !v.is_object())
    return absl::InvalidArgumentError(absl::StrCat(origin, ": vocab is not a JSON object"));
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (!it.value().is_number_integer())
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": vocab entry \"", it.key(), "\" is not an integer id"));
    t.vocab_[it.key()] = it.value().get<int64_t>();
  }
  int64_t rank = 0;
  int line_no = 0;
  for (absl::string_view piece : absl::StrSplit(merges_txt, '\n')) {
    std::string line(piece);
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_no == 1 && line.rfind("#version", 0) == 0)) continue;
    std::vector<absl::string_view> parts = absl::StrSplit(line, ' ');
    if (parts.size() != 2)
      return absl::InvalidArgumentError(absl::StrCat(
          origin, " line ", line_no, ": a merge needs exactly two symbols: \"", line, "\""));
    t.merge_ranks_.emplace(std::string(line), rank++);
  }
  return t;
}

absl::Status CLIPTokenizer::SetSpecialTokens(const std::string& bos, const std::string& eos,
                                             const std::string& pad, const std::string& origin) {
  auto id = [&](const std::string& tok) -> absl::StatusOr<int64_t> {
    auto it = vocab_.find(tok);
    if (it == vocab_.end())
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": special token \"", tok, "\" is not in the vocabulary"));
    return it->second;
  };
  ASSIGN_OR_RETURN(bos_id_, id(bos));
  ASSIGN_OR_RETURN(eos_id_, id(eos));
  ASSIGN_OR_RETURN(pad_id_, id(pad));
  unk_id_ = eos_id_;
  special_ = {{bos, bos_id_}, {eos, eos_id_}};
  return absl::OkStatus();
}

absl::StatusOr<CLIPTokenizer> CLIPTokenizer::Load(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path d(dir);
  CLIPTokenizer t;
  std::string origin;
  if (fs::exists(d / "vocab.json") && fs::exists(d / "merges.txt")) {
    ASSIGN_OR_RETURN(std::string vocab, ReadFile((d / "vocab.json").string()));
    ASSIGN_OR_RETURN(std::string merges, ReadFile((d / "merges.txt").string()));
    origin = (d / "merges.txt").string();
    ASSIGN_OR_RETURN(t, FromVocabAndMerges(vocab, merges, origin));
  } else if (fs::exists(d / "tokenizer.json")) {
    origin = (d / "tokenizer.json").string();
    ASSIGN_OR_RETURN(std::string text, ReadFile(origin));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.contains("model") || !j["model"].contains("vocab") ||
        !j["model"].contains("merges")) {
      return absl::InvalidArgumentError(
          absl::StrCat(origin, ": expected a BPE model with vocab and merges"));
    }
    std::string merges;
    for (const auto& m : j["model"]["merges"]) {
      if (m.is_string()) {
        absl::StrAppend(&merges, m.get<std::string>(), "\n");
      } else if (m.is_array() && m.size() == 2) {
        absl::StrAppend(&merges, m[0].get<std::string>(), " ", m[1].get<std::string>(), "\n");
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(origin, ": malformed merge entry ", m.dump()));
      }
    }
    ASSIGN_OR_RETURN(t, FromVocabAndMerges(j["model"]["vocab"].dump(), merges, origin));
  } else {
    return absl::NotFoundError(absl::StrCat(dir, ": no vocab.json + merges.txt or tokenizer.json"));
  }
  std::string bos = "<|startoftext|>", eos = "<|endoftext|>", pad = "<|endoftext|>";
  for (const char* name : {"special_tokens_map.json", "tokenizer_config.json"}) {
    const fs::path p = d / name;
    if (!fs::exists(p)) continue;
    ASSIGN_OR_RETURN(std::string text, ReadFile(p.string()));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return absl::InvalidArgumentError(absl::StrCat(p.string(), ": invalid JSON"));
    auto read = [&](const char* key, std::string& into) -> absl::Status {
      if (!j.contains(key) || j[key].is_null()) return absl::OkStatus();
      auto s = TokenString(j[key]);
      if (!s.ok())
        return absl::InvalidArgumentError(
            absl::StrCat(p.string(), ": key \"", key, "\": ", s.status().message()));
      into = *s;
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(read("bos_token", bos));
    RETURN_IF_ERROR(read("eos_token", eos));
    RETURN_IF_ERROR(read("pad_token", pad));
    if (j.contains("model_max_length") && j["model_max_length"].is_number_integer()) {
      int64_t m = j["model_max_length"].get<int64_t>();
      if (m > 0 && m < 100000) t.model_max_length_ = m;
    }
  }
  RETURN_IF_ERROR(t.SetSpecialTokens(bos, eos, pad, origin));
  return t;
}

void CLIPTokenizer::Bpe(const std::string& word_bytes, std::vector<int64_t>& out) const {
  std::vector<std::string> symbols;
  for (unsigned char b : word_bytes) symbols.push_back(byte_to_unicode_[b]);
  if (symbols.empty()) return;
  symbols.back() += "</w>";
  while (symbols.size() > 1) {
    int64_t best = std::numeric_limits<int64_t>::max();
    size_t best_i = 0;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = merge_ranks_.find(symbols[i] + " " + symbols[i + 1]);
      if (it != merge_ranks_.end() && it->second < best) {
        best = it->second;
        best_i = i;
      }
    }
    if (best == std::numeric_limits<int64_t>::max()) break;
    // Merge every occurrence of the best pair, left to right.
    const std::string left = symbols[best_i], right = symbols[best_i + 1];
    std::vector<std::string> merged;
    for (size_t i = 0; i < symbols.size();) {
      if (i + 1 < symbols.size() && symbols[i] == left && symbols[i + 1] == right) {
        merged.push_back(left + right);
        i += 2;
      } else {
        merged.push_back(symbols[i]);
        ++i;
      }
    }
    symbols = std::move(merged);
  }
  for (const auto& s : symbols) {
    auto it = vocab_.find(s);
    out.push_back(it == vocab_.end() ? unk_id_ : it->second);
  }
}

void CLIPTokenizer::EncodeSegment(std::string_view text, std::vector<int64_t>& out) const {
  const std::vector<UChar32> cps = Normalize(text);
  const size_t n = cps.size();
  size_t i = 0;
  while (i < n) {
    const UChar32 c = cps[i];
    if (IsSpace(c)) {
      ++i;
      continue;
    }
    size_t end = i + 1;
    if (c == '\'' && i + 1 < n) {
      UChar32 a = cps[i + 1], b = i + 2 < n ? cps[i + 2] : 0;
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        end = i + 2;
      } else if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) {
        end = i + 3;
      }
    }
    if (end == i + 1) {
      if (IsLetter(c)) {
        while (end < n && IsLetter(cps[end])) ++end;
      } else if (!IsNumber(c)) {
        while (end < n && !IsSpace(cps[end]) && !IsLetter(cps[end]) && !IsNumber(cps[end])) ++end;
      }
    }
    Bpe(ToUtf8(cps, i, end), out);
    i = end;
  }
}

std::vector<int64_t> CLIPTokenizer::Encode(std::string_view text) const {
  std::vector<int64_t> out;
  // Special tokens are matched verbatim before normalization, as added tokens are.
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t best = std::string_view::npos;
    const std::pair<std::string, int64_t>* which = nullptr;
    for (const auto& sp : special_) {
      size_t f = text.find(sp.first, pos);
      if (f < best) {
        best = f;
        which = &sp;
      }
    }
    if (which == nullptr) {
      EncodeSegment(text.substr(pos), out);
      break;
    }
    EncodeSegment(text.substr(pos, best - pos), out);
    out.push_back(which->second);
    pos = best + which->first.size();
  }
  return out;
}

std::vector<int64_t> CLIPTokenizer::EncodePadded(std::string_view text, int64_t max_length) const {
  std::vector<int64_t> ids = Encode(text);
  if (static_cast<int64_t>(ids.size()) > max_length - 2) ids.resize(max_length - 2);
  std::vector<int64_t> out;
  out.reserve(max_length);
  out.push_back(bos_id_);
  out.insert(out.end(), ids.begin(), ids.end());
  out.push_back(eos_id_);
  while (static_cast<int64_t>(out.size()) < max_length) out.push_back(pad_id_);
  return out;
}

torch::Tensor CLIPTokenizer::Tokenize(const std::vector<std::string>& texts) const {
  auto t = torch::empty({static_cast<int64_t>(texts.size()), model_max_length_}, torch::kLong);
  for (size_t i = 0; i < texts.size(); ++i) {
    auto ids = EncodePadded(texts[i], model_max_length_);
    std::memcpy(t[i].data_ptr<int64_t>(), ids.data(), ids.size() * sizeof(int64_t));
  }
  return t;
}

absl::Status WriteCLIPTokenizerFiles(const std::string& bpe_gz_path, const std::string& out_dir) {
  gzFile gz = gzopen(bpe_gz_path.c_str(), "rb");
  if (gz == nullptr) return absl::NotFoundError(absl::StrCat("cannot open ", bpe_gz_path));
  std::string text;
  char buf[1 << 16];
  for (int n; (n = gzread(gz, buf, sizeof(buf))) > 0;) text.append(buf, static_cast<size_t>(n));
  const bool ok = gzeof(gz) != 0;
  gzclose(gz);
  if (!ok) return absl::DataLossError(absl::StrCat(bpe_gz_path, ": corrupt gzip stream"));
  std::vector<std::string> lines = absl::StrSplit(text, '\n');
  // Line 0 is a version header; CLIP uses the next 49152 - 256 - 2 merges.
  constexpr size_t kMerges = 49152 - 256 - 2;
  if (lines.size() < kMerges + 1)
    return absl::InvalidArgumentError(
        absl::StrCat(bpe_gz_path, ": ", lines.size(), " lines, expected at least ", kMerges + 1));
  // Ids follow GPT-2's table order: printable bytes first, then the rest.
  const std::vector<std::string> table = BytesToUnicode();
  std::vector<int> order;
  for (int b = '!'; b <= '~'; ++b) order.push_back(b);
  for (int b = 0xA1; b <= 0xAC; ++b) order.push_back(b);
  for (int b = 0xAE; b <= 0xFF; ++b) order.push_back(b);
  for (int b = 0; b < 256; ++b) {
    if (std::find(order.begin(), order.end(), b) == order.end()) order.push_back(b);
  }
  std::vector<std::string> vocab;
  for (int b : order) vocab.push_back(table[b]);
  for (int b : order) vocab.push_back(table[b] + "</w>");
  std::string merges = "#version: 0.2\n";
  for (size_t i = 1; i <= kMerges; ++i) {
    std::vector<std::string> pair = absl::StrSplit(lines[i], ' ');
    if (pair.size() != 2)
      return absl::InvalidArgumentError(
          absl::StrCat(bpe_gz_path, ":", i + 1, ": expected two symbols, got \"", lines[i], "\""));
    vocab.push_back(pair[0] + pair[1]);
    absl::StrAppend(&merges, lines[i], "\n");
  }
  vocab.emplace_back("<|startoftext|>");
  vocab.emplace_back("<|endoftext|>");
  nlohmann::ordered_json v = nlohmann::ordered_json::object();
  for (size_t i = 0; i < vocab.size(); ++i) v[vocab[i]] = i;
  const nlohmann::json cfg = {{"tokenizer_class", "CLIPTokenizer"},
                              {"model_max_length", 77},
                              {"bos_token", "<|startoftext|>"},
                              {"eos_token", "<|endoftext|>"},
                              {"unk_token", "<|endoftext|>"},
                              {"pad_token", "<|endoftext|>"}};
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  RETURN_IF_ERROR(WriteFileAtomic((fs::path(out_dir) / "vocab.json").string(), v.dump()));
  RETURN_IF_ERROR(WriteFileAtomic((fs::path(out_dir) / "merges.txt").string(), merges));
  return WriteFileAtomic((fs::path(out_dir) / "tokenizer_config.json").string(), cfg.dump(2));
}

}  // namespace sd
