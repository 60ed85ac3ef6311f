#pragma once
// What the control plane knows about stages without LibTorch: one descriptor per
// stage (its job.yaml section parsed into typed options, validation, progress
// total, what it produces and needs), listed in stages/catalog.inc. The
// coordinator and `sdctl submit` parse and validate every stage of a job through
// them before anything is stored; workers run the same parse.
#include <any>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/job_spec.h"
#include "common/yaml_reader.h"

namespace sd::stages {

enum class Produces {
  kModel,     // a diffusers folder, the next stage's input
  kArtifact,  // beside the chain (an export, a report); the next stage reads the same input
};

struct StageDescriptor {
  std::string name;
  std::string section;  // its job.yaml section; "" when it has no options
  Produces produces = Produces::kModel;
  bool needs_dataset = false;
  // When whether it needs one depends on its options (quantize: only for INT8 calibration).
  bool (*needs_dataset_with)(const std::any& options) = nullptr;
  bool needs_teacher = false;  // reads the job's model (the teacher) beside its input
  // Reads the section (absent: every option at its default) into the stage's
  // options struct, with every cross-check against the shared settings. Reads
  // each key unconditionally, so a dry run on an absent section lists them all.
  absl::StatusOr<std::any> (*parse)(SectionReader& section, const JobSpec& job) = nullptr;
  int64_t (*total_steps)(const std::any& options) = nullptr;  // for progress
};

// Every stage of this build, in pipeline order.
const std::vector<StageDescriptor>& Catalog();
const StageDescriptor* FindStage(const std::string& name);
// The seed's whole pipeline, in order, built or not (a job naming a stage this
// build lacks is refused by name, never skipped).
const std::vector<std::string>& PipelineStageNames();
// Every key job.yaml accepts: "" for the top level, then one entry per section.
std::map<std::string, std::vector<std::string>> KnownJobKeys();

}  // namespace sd::stages

namespace sd {

// Parses and validates a whole job: the shared keys, each stage's section, the
// stage list. Errors name the file, the line and the key, and suggest the nearest
// known key for a misspelt one. `origin` is the file name used in messages.
absl::StatusOr<JobSpec> ParseJobSpec(const std::string& yaml_text, const std::string& origin);
absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path);
// The number of steps `stage` runs under this job (for progress); 0 when unknown.
int64_t StageTotalSteps(const JobSpec& job, const std::string& stage);

}  // namespace sd
