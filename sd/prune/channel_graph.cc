#include "sd/prune/channel_graph.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace sd::prune {
namespace {

std::string ShapeString(const torch::Tensor& t) {
  return absl::StrCat("[", absl::StrJoin(t.sizes().vec(), ", "), "]");
}

// Per index along `axis`, the L1 norm of the slice, divided by the mean over the axis.
torch::Tensor SliceImportance(const torch::Tensor& t, int64_t axis) {
  auto a = t.to(torch::kFloat64).abs();
  if (a.dim() > 1) {
    std::vector<int64_t> other;
    for (int64_t d = 0; d < a.dim(); ++d) {
      if (d != axis) other.push_back(d);
    }
    a = a.sum(other);
  }
  const double mean = a.mean().item<double>();
  return mean > 0 ? a / mean : a;
}

}  // namespace

int64_t KeepPerGroup(int64_t group_size, double ratio) {
  return std::max<int64_t>(1, std::llround(static_cast<double>(group_size) * (1.0 - ratio)));
}

int ChannelGraph::AddStream(std::string name, int64_t width, int64_t groups,
                            int64_t keep_per_group) {
  Stream s;
  s.name = std::move(name);
  s.width = width;
  s.groups = groups;
  s.keep = keep_per_group;
  streams_.push_back(std::move(s));
  return static_cast<int>(streams_.size()) - 1;
}

void ChannelGraph::Use(const std::string& tensor, int64_t axis, std::vector<int> streams) {
  uses_.push_back({tensor, axis, std::move(streams)});
}

void ChannelGraph::UseNorm(const std::string& module, int stream) {
  Use(module + ".weight", 0, stream);
  Use(module + ".bias", 0, stream);
}

void ChannelGraph::GroupNorm(const std::string& module, std::vector<int> streams, int64_t groups) {
  norms_.push_back({module, std::move(streams), groups});
}

int64_t ChannelGraph::ConcatWidth(const std::vector<int>& streams) const {
  int64_t w = 0;
  for (int s : streams) w += streams_[s].width;
  return w;
}

std::vector<int64_t> ChannelGraph::ConcatKept(const std::vector<int>& streams) const {
  std::vector<int64_t> out;
  int64_t offset = 0;
  for (int s : streams) {
    for (int64_t k : streams_[s].kept) out.push_back(offset + k);
    offset += streams_[s].width;
  }
  return out;
}

absl::Status ChannelGraph::Select(const safetensors::TensorMap& weights,
                                  const std::string& component) {
  std::vector<torch::Tensor> importance(streams_.size());
  for (size_t i = 0; i < streams_.size(); ++i)
    importance[i] = torch::zeros({streams_[i].width}, torch::kFloat64);
  for (const auto& u : uses_) {
    auto it = weights.find(u.tensor);
    if (it == weights.end())
      return absl::InvalidArgumentError(
          absl::StrCat(component, ": the pruner expects tensor ", u.tensor,
                       " for this config, and the weights have none (a block it does not know?)"));
    const torch::Tensor& t = it->second;
    const int64_t w = ConcatWidth(u.streams);
    if (t.dim() <= u.axis || t.size(u.axis) != w)
      return absl::InvalidArgumentError(
          absl::StrCat(component, ": tensor ", u.tensor, " has shape ", ShapeString(t),
                       "; its axis ", u.axis, " should have ", w, " channels by the config"));
    const auto imp = SliceImportance(t, u.axis);
    int64_t offset = 0;
    for (int s : u.streams) {
      importance[s] += imp.slice(0, offset, offset + streams_[s].width);
      offset += streams_[s].width;
    }
  }
  // Group boundaries of every GroupNorm a stream is part of, in its own coordinates.
  std::vector<std::set<int64_t>> cuts(streams_.size());
  for (const auto& n : norms_) {
    const int64_t total = ConcatWidth(n.streams);
    if (n.groups <= 0 || total < n.groups || total % n.groups != 0)
      return absl::InvalidArgumentError(absl::StrCat(component, ": ", n.module, " has ", total,
                                                     " channels in ", n.groups, " groups"));
    const int64_t gs = total / n.groups;
    int64_t offset = 0;
    for (int s : n.streams) {
      for (int64_t b = (offset / gs + 1) * gs; b < offset + streams_[s].width; b += gs)
        cuts[s].insert(b - offset);
      offset += streams_[s].width;
    }
  }
  for (size_t i = 0; i < streams_.size(); ++i) {
    Stream& s = streams_[i];
    if (s.groups <= 0 || s.width % s.groups != 0 || s.keep < 1 || s.keep > s.width / s.groups)
      return absl::InvalidArgumentError(absl::StrCat(component, ": ", s.name, " cannot keep ",
                                                     s.keep, " of each of its ", s.groups,
                                                     " groups of ", s.width / s.groups));
    const int64_t gs = s.width / s.groups;
    const auto imp = importance[i].contiguous();
    const double* v = imp.data_ptr<double>();
    s.kept.clear();
    for (int64_t g = 0; g < s.groups; ++g) {
      const int64_t lo = g * gs, hi = lo + gs;
      std::vector<int64_t> bounds = {lo};
      for (auto it = cuts[i].upper_bound(lo); it != cuts[i].end() && *it < hi; ++it)
        bounds.push_back(*it);
      bounds.push_back(hi);
      // The group's quota over its atoms in proportion to their size (largest remainder).
      const size_t atoms = bounds.size() - 1;
      std::vector<int64_t> quota(atoms);
      std::vector<std::pair<double, size_t>> rest;
      int64_t given = 0;
      for (size_t a = 0; a < atoms; ++a) {
        const double exact = static_cast<double>(s.keep * (bounds[a + 1] - bounds[a])) / gs;
        quota[a] = static_cast<int64_t>(std::floor(exact + 1e-9));
        given += quota[a];
        rest.emplace_back(-(exact - quota[a]), a);
      }
      std::stable_sort(rest.begin(), rest.end());
      for (size_t r = 0; given < s.keep && r < rest.size(); ++r, ++given) ++quota[rest[r].second];
      for (size_t a = 0; a < atoms; ++a) {
        std::vector<int64_t> idx(bounds[a + 1] - bounds[a]);
        std::iota(idx.begin(), idx.end(), bounds[a]);
        std::stable_sort(idx.begin(), idx.end(), [&](int64_t x, int64_t y) { return v[x] > v[y]; });
        idx.resize(quota[a]);
        std::sort(idx.begin(), idx.end());
        s.kept.insert(s.kept.end(), idx.begin(), idx.end());
      }
    }
  }
  for (const auto& n : norms_) {
    const auto kept = static_cast<int64_t>(ConcatKept(n.streams).size());
    if (kept % n.groups != 0)
      return absl::InvalidArgumentError(absl::StrCat(component, ": ", n.module, " would keep ",
                                                     kept, " channels, not divisible into its ",
                                                     n.groups, " groups"));
  }
  return absl::OkStatus();
}

absl::StatusOr<safetensors::TensorMap> ChannelGraph::Apply(
    const safetensors::TensorMap& weights) const {
  safetensors::TensorMap out = weights;
  for (const auto& u : uses_) {
    auto it = out.find(u.tensor);
    if (it == out.end())
      return absl::InvalidArgumentError(absl::StrCat("no tensor ", u.tensor, " to prune"));
    const auto kept = ConcatKept(u.streams);
    if (it->second.size(u.axis) != ConcatWidth(u.streams))
      return absl::InvalidArgumentError(absl::StrCat("tensor ", u.tensor,
                                                     " is named twice on axis ", u.axis, " (",
                                                     ShapeString(it->second), ")"));
    it->second = it->second.index_select(u.axis, torch::tensor(kept, torch::kInt64)).contiguous();
  }
  return out;
}

nlohmann::json ChannelGraph::Map() const {
  nlohmann::json m = nlohmann::json::object();
  for (const auto& u : uses_) {
    const auto kept = ConcatKept(u.streams);
    if (static_cast<int64_t>(kept.size()) == ConcatWidth(u.streams)) continue;  // nothing cut
    m[u.tensor][std::to_string(u.axis)] = kept;
  }
  return m;
}

nlohmann::json ChannelGraph::GroupNormReport() const {
  nlohmann::json r = nlohmann::json::object();
  for (const auto& n : norms_) {
    const auto kept = ConcatKept(n.streams);
    const int64_t total = ConcatWidth(n.streams);
    const int64_t now = static_cast<int64_t>(kept.size());
    const int64_t gs_old = total / n.groups, gs_new = now / n.groups;
    int64_t split = 0;
    for (int64_t g = 0; g < n.groups; ++g) {
      const int64_t first = kept[g * gs_new] / gs_old;
      for (int64_t k = g * gs_new; k < (g + 1) * gs_new; ++k) {
        if (kept[k] / gs_old != first) {
          ++split;
          break;
        }
      }
    }
    r[n.module] = {
        {"channels", total}, {"kept", now}, {"groups", n.groups}, {"groups_not_subsets", split}};
  }
  return r;
}

}  // namespace sd::prune
