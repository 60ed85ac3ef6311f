#pragma once
// An ONNX graph in plain C++ types. The model code (LibTorch side) builds one of
// these; model_writer.cc (protobuf side) serializes it. The two sides never see
// each other's headers: the torch wheel carries its own protobuf, which clashes
// with Debian's that libonnx is built against.
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

#include "absl/status/status.h"

namespace sd::onnx {

// TensorProto.DataType values.
enum class ElemType : int32_t {
  kFloat = 1,
  kInt32 = 6,
  kInt64 = 7,
  kBool = 9,
  kFloat16 = 10,
};
size_t ElemSize(ElemType t);

// One axis of a graph input or output: a fixed size, or a named symbolic one.
struct Dim {
  int64_t value = -1;
  std::string param;
  static Dim Fixed(int64_t v) { return {v, {}}; }
  static Dim Symbolic(std::string name) { return {-1, std::move(name)}; }
};

struct ValueInfo {
  std::string name;
  ElemType type = ElemType::kFloat;
  std::vector<Dim> shape;
};

using AttributeValue =
    std::variant<int64_t, float, std::string, std::vector<int64_t>, std::vector<float>>;
struct Attribute {
  std::string name;
  AttributeValue value;
};

struct Node {
  std::string op_type;
  std::string name;
  std::vector<std::string> inputs, outputs;
  std::vector<Attribute> attributes;
};

// A constant. Its bytes are produced when the model is written, one tensor at a
// time, so a graph over a 3.4 GB UNet does not hold a second copy of the weights.
struct Initializer {
  std::string name;
  ElemType type = ElemType::kFloat;
  std::vector<int64_t> shape;
  // Appends exactly numel(shape) * ElemSize(type) little-endian bytes.
  std::function<void(std::string* out)> bytes;
  int64_t numel() const;
};

class Graph {
 public:
  explicit Graph(std::string name) : name_(std::move(name)) {}

  void AddInput(ValueInfo v) { inputs_.push_back(std::move(v)); }
  void AddOutput(ValueInfo v) { outputs_.push_back(std::move(v)); }

  // Adds a node named `scope`/op (unique) with `n_outputs` fresh outputs.
  std::vector<std::string> Op(std::string_view op_type, std::vector<std::string> inputs,
                              std::vector<Attribute> attributes, size_t n_outputs);
  std::string Op(std::string_view op_type, std::vector<std::string> inputs,
                 std::vector<Attribute> attributes = {}) {
    return Op(op_type, std::move(inputs), std::move(attributes), 1)[0];
  }
  // Renames the value `from` (an op output) to `to`, e.g. a graph output's name.
  void Rename(const std::string& from, const std::string& to);

  // Initializers keep their given name (the state_dict's); a name given twice
  // is the caller's bug and fails at Write.
  std::string AddInitializer(Initializer init);
  // Small constants, deduplicated by value.
  std::string Int64s(const std::vector<int64_t>& values);
  std::string Int64(int64_t value);  // a 0-d tensor
  std::string Float(float value);    // a 0-d tensor
  std::string Floats(const std::vector<float>& values, const std::vector<int64_t>& shape);

  // Node names are prefixed with the current scope (the module's state_dict
  // prefix), so a node in the file says which module emitted it.
  void PushScope(std::string scope) { scopes_.push_back(std::move(scope)); }
  void PopScope() { scopes_.pop_back(); }

  const std::string& name() const { return name_; }
  const std::vector<ValueInfo>& inputs() const { return inputs_; }
  const std::vector<ValueInfo>& outputs() const { return outputs_; }
  const std::vector<Node>& nodes() const { return nodes_; }
  const std::vector<Initializer>& initializers() const { return initializers_; }
  // Sum of initializer bytes.
  int64_t weight_bytes() const;

 private:
  std::string Fresh(std::string_view hint);

  std::string name_;
  std::vector<ValueInfo> inputs_, outputs_;
  std::vector<Node> nodes_;
  std::vector<Initializer> initializers_;
  std::vector<std::string> scopes_;
  std::map<std::string, int64_t> counters_;
  std::map<std::string, std::string> constants_;  // value key -> initializer name
};

// Scope guard for Graph::PushScope.
class Scope {
 public:
  Scope(Graph& g, std::string scope) : g_(g) { g_.PushScope(std::move(scope)); }
  ~Scope() { g_.PopScope(); }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Graph& g_;
};

struct WriteOptions {
  // ONNX IR 8 / opset 17: the newest both Debian's libonnx 1.12 checker and the
  // onnxruntime wheel accept.
  int64_t ir_version = 8;
  int64_t opset = 17;
  std::string producer_name = "sdcompress";
  std::string producer_version;
  // Initializers at least this large go to the external data file (a protobuf
  // message cannot exceed 2 GB, and the fp32 UNet is 3.4 GB).
  int64_t external_threshold_bytes = 1024;
  // Key/value pairs stored as the model's metadata_props.
  std::map<std::string, std::string> metadata;
};

struct WriteReport {
  std::string model_path, data_path;  // data_path empty when nothing went external
  int64_t model_bytes = 0, data_bytes = 0;
  int64_t nodes = 0, initializers = 0;
};

// Writes `path` and, beside it, `<file name>.data` with the large initializers
// (4 KiB-aligned so a runtime may map them). Both go to temp files renamed into
// place, the data first: a crash leaves the old pair or no model, never a model
// that points at a partial data file.
absl::Status WriteModel(const Graph& graph, const std::string& path, const WriteOptions& options,
                        WriteReport* report = nullptr);

// onnx::checker::check_model on the written file (external data included),
// then strict shape inference; the error carries the checker's message.
absl::Status CheckModel(const std::string& path);

}  // namespace sd::onnx
