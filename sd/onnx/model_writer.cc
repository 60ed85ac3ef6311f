// The protobuf side of ONNX export: sd::onnx::Graph -> onnx.proto, and the checker.
// Nothing here includes LibTorch (see graph.h).
#include <onnx/checker.h>
#include <onnx/common/file_utils.h>
#include <onnx/onnx_pb.h>
#include <onnx/shape_inference/implementation.h>

#include <exception>
#include <filesystem>
#include <optional>
#include <set>

#include "absl/strings/str_cat.h"
#include "sd/onnx/graph.h"
#include "sd/util/file.h"
#include "sd/util/status_macros.h"

namespace sd::onnx {
namespace fs = std::filesystem;
namespace {

constexpr int64_t kAlign = 4096;

void SetAttribute(const Attribute& a, ::onnx::AttributeProto* p) {
  p->set_name(a.name);
  if (const auto* i = std::get_if<int64_t>(&a.value)) {
    p->set_type(::onnx::AttributeProto::INT);
    p->set_i(*i);
  } else if (const auto* f = std::get_if<float>(&a.value)) {
    p->set_type(::onnx::AttributeProto::FLOAT);
    p->set_f(*f);
  } else if (const auto* s = std::get_if<std::string>(&a.value)) {
    p->set_type(::onnx::AttributeProto::STRING);
    p->set_s(*s);
  } else if (const auto* is = std::get_if<std::vector<int64_t>>(&a.value)) {
    p->set_type(::onnx::AttributeProto::INTS);
    for (int64_t v : *is) p->add_ints(v);
  } else if (const auto* fs = std::get_if<std::vector<float>>(&a.value)) {
    p->set_type(::onnx::AttributeProto::FLOATS);
    for (float v : *fs) p->add_floats(v);
  }
}

void SetValueInfo(const ValueInfo& v, ::onnx::ValueInfoProto* p) {
  p->set_name(v.name);
  auto* t = p->mutable_type()->mutable_tensor_type();
  t->set_elem_type(static_cast<int32_t>(v.type));
  auto* shape = t->mutable_shape();
  for (const auto& d : v.shape) {
    auto* dim = shape->add_dim();
    if (d.param.empty()) {
      dim->set_dim_value(d.value);
    } else {
      dim->set_dim_param(d.param);
    }
  }
}

absl::Status Fail(const std::string& path, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("ONNX model ", path, ": ", what));
}

}  // namespace

absl::Status WriteModel(const Graph& graph, const std::string& path, const WriteOptions& o,
                        WriteReport* report) {
  ::onnx::ModelProto model;
  model.set_ir_version(o.ir_version);
  model.set_producer_name(o.producer_name);
  model.set_producer_version(o.producer_version);
  auto* opset = model.add_opset_import();
  opset->set_domain("");
  opset->set_version(o.opset);
  for (const auto& [k, v] : o.metadata) {
    auto* p = model.add_metadata_props();
    p->set_key(k);
    p->set_value(v);
  }
  auto* g = model.mutable_graph();
  g->set_name(graph.name());
  for (const auto& v : graph.inputs()) SetValueInfo(v, g->add_input());
  for (const auto& v : graph.outputs()) SetValueInfo(v, g->add_output());
  for (const auto& n : graph.nodes()) {
    auto* p = g->add_node();
    p->set_op_type(n.op_type);
    p->set_name(n.name);
    for (const auto& s : n.inputs) p->add_input(s);
    for (const auto& s : n.outputs) p->add_output(s);
    for (const auto& a : n.attributes) SetAttribute(a, p->add_attribute());
  }

  const std::string data_name = fs::path(path).filename().string() + ".data";
  const std::string data_path = (fs::path(path).parent_path() / data_name).string();
  std::optional<AtomicFileWriter> data;
  int64_t offset = 0;
  std::set<std::string> names;
  std::string bytes;
  for (const auto& init : graph.initializers()) {
    if (!names.insert(init.name).second)
      return Fail(path, absl::StrCat("initializer \"", init.name, "\" is defined twice"));
    auto* t = g->add_initializer();
    t->set_name(init.name);
    t->set_data_type(static_cast<int32_t>(init.type));
    for (int64_t d : init.shape) t->add_dims(d);
    bytes.clear();
    init.bytes(&bytes);
    const int64_t want = init.numel() * static_cast<int64_t>(ElemSize(init.type));
    if (static_cast<int64_t>(bytes.size()) != want)
      return Fail(path, absl::StrCat("initializer \"", init.name, "\" produced ", bytes.size(),
                                     " bytes for ", want, " expected"));
    if (want < o.external_threshold_bytes) {
      t->set_raw_data(bytes);
      continue;
    }
    if (!data) {
      ASSIGN_OR_RETURN(auto w, AtomicFileWriter::Open(data_path));
      data.emplace(std::move(w));
    }
    const int64_t pad = (kAlign - offset % kAlign) % kAlign;
    if (pad > 0) {
      const std::string zeros(static_cast<size_t>(pad), '\0');
      RETURN_IF_ERROR(data->Append(zeros.data(), zeros.size()));
      offset += pad;
    }
    RETURN_IF_ERROR(data->Append(bytes.data(), bytes.size()));
    t->set_data_location(::onnx::TensorProto::EXTERNAL);
    auto add = [t](const std::string& k, const std::string& v) {
      auto* e = t->add_external_data();
      e->set_key(k);
      e->set_value(v);
    };
    add("location", data_name);
    add("offset", std::to_string(offset));
    add("length", std::to_string(want));
    offset += want;
  }
  std::string serialized;
  if (!model.SerializeToString(&serialized))
    return Fail(path, "protobuf serialization failed (graph over 2 GB?)");
  // The data first: a model is only ever renamed into place over complete data.
  if (data) {
    RETURN_IF_ERROR(data->Commit());
  } else {
    std::error_code ec;
    fs::remove(data_path, ec);
  }
  RETURN_IF_ERROR(WriteFileAtomic(path, serialized));
  if (report != nullptr) {
    report->model_path = path;
    report->data_path = data ? data_path : "";
    report->model_bytes = static_cast<int64_t>(serialized.size());
    report->data_bytes = offset;
    report->nodes = graph.nodes().size();
    report->initializers = graph.initializers().size();
  }
  return absl::OkStatus();
}

absl::Status CheckModel(const std::string& path) {
  try {
    ::onnx::checker::check_model(path);
    ::onnx::ModelProto model;
    ::onnx::LoadProtoFromPath(path, model);
    ::onnx::ShapeInferenceOptions options{/*check_type=*/true, /*error_mode=*/1,
                                          /*enable_data_propagation=*/false};
    ::onnx::shape_inference::InferShapes(model, ::onnx::OpSchemaRegistry::Instance(), options);
  } catch (const std::exception& e) {
    return Fail(path, absl::StrCat("rejected by the onnx checker: ", e.what()));
  }
  return absl::OkStatus();
}

}  // namespace sd::onnx
