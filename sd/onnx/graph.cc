#include "sd/onnx/graph.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace sd::onnx {

size_t ElemSize(ElemType t) {
  switch (t) {
    case ElemType::kFloat:
    case ElemType::kInt32:
      return 4;
    case ElemType::kInt64:
      return 8;
    case ElemType::kBool:
      return 1;
    case ElemType::kFloat16:
      return 2;
  }
  return 0;
}

int64_t Initializer::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string Graph::Fresh(std::string_view hint) {
  std::string base =
      scopes_.empty() ? std::string(hint) : absl::StrCat(scopes_.back(), "/", std::string(hint));
  const int64_t n = counters_[base]++;
  return n == 0 ? base : absl::StrCat(base, "_", n);
}

std::vector<std::string> Graph::Op(std::string_view op_type, std::vector<std::string> inputs,
                                   std::vector<Attribute> attributes, size_t n_outputs) {
  Node node;
  node.op_type = std::string(op_type);
  node.name = Fresh(op_type);
  node.inputs = std::move(inputs);
  node.attributes = std::move(attributes);
  for (size_t i = 0; i < n_outputs; ++i)
    node.outputs.push_back(n_outputs == 1 ? node.name : absl::StrCat(node.name, ":", i));
  nodes_.push_back(std::move(node));
  return nodes_.back().outputs;
}

void Graph::Rename(const std::string& from, const std::string& to) {
  for (auto& n : nodes_) {
    for (auto& s : n.inputs)
      if (s == from) s = to;
    for (auto& s : n.outputs)
      if (s == from) s = to;
  }
}

std::string Graph::AddInitializer(Initializer init) {
  std::string name = init.name;
  initializers_.push_back(std::move(init));
  return name;
}

namespace {

template <typename T>
Initializer Constant(std::string name, ElemType type, std::vector<int64_t> shape,
                     std::vector<T> values) {
  Initializer init;
  init.name = std::move(name);
  init.type = type;
  init.shape = std::move(shape);
  init.bytes = [values = std::move(values)](std::string* out) {
    out->append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(T));
  };
  return init;
}

}  // namespace

std::string Graph::Int64s(const std::vector<int64_t>& values) {
  const std::string key = absl::StrCat("i64[", absl::StrJoin(values, ","), "]");
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  std::string name = absl::StrCat("const_i64_", constants_.size());
  AddInitializer(Constant(name, ElemType::kInt64, {static_cast<int64_t>(values.size())}, values));
  constants_[key] = name;
  return name;
}

std::string Graph::Int64(int64_t value) {
  const std::string key = absl::StrCat("i64:", value);
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  std::string name = absl::StrCat("const_i64_", constants_.size());
  AddInitializer(Constant<int64_t>(name, ElemType::kInt64, {}, {value}));
  constants_[key] = name;
  return name;
}

std::string Graph::Float(float value) { return Floats({value}, {}); }

std::string Graph::Floats(const std::vector<float>& values, const std::vector<int64_t>& shape) {
  // Keyed by the bit patterns, so -0.0 and 0.0 (or two NaNs) stay apart.
  std::vector<uint32_t> bits(values.size());
  std::memcpy(bits.data(), values.data(), values.size() * sizeof(float));
  const std::string key =
      absl::StrCat("f32[", absl::StrJoin(bits, ","), "]/", absl::StrJoin(shape, ","));
  auto it = constants_.find(key);
  if (it != constants_.end()) return it->second;
  std::string name = absl::StrCat("const_f32_", constants_.size());
  AddInitializer(Constant(name, ElemType::kFloat, shape, values));
  constants_[key] = name;
  return name;
}

int64_t Graph::weight_bytes() const {
  int64_t n = 0;
  for (const auto& i : initializers_) n += i.numel() * static_cast<int64_t>(ElemSize(i.type));
  return n;
}

}  // namespace sd::onnx
