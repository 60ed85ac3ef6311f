#pragma once
// Early-return helpers for absl::Status / absl::StatusOr, the error currency across
// library boundaries.
#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SD_CONCAT_INNER(a, b) a##b
#define SD_CONCAT(a, b) SD_CONCAT_INNER(a, b)

#define RETURN_IF_ERROR(expr)                \
  do {                                       \
    ::absl::Status sd_status_ = (expr);      \
    if (!sd_status_.ok()) return sd_status_; \
  } while (0)

#define ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return tmp.status();         \
  lhs = std::move(tmp).value()

#define ASSIGN_OR_RETURN(lhs, expr) ASSIGN_OR_RETURN_IMPL(SD_CONCAT(sd_or_, __LINE__), lhs, expr)
