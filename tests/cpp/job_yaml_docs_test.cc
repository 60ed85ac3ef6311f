// docs/job-yaml.md cannot go stale: every key its yaml blocks show is one the
// parser reads (the stage descriptors and the shared keys), and every key the
// parser reads is shown there.
#include <gtest/gtest.h>
#include <yaml-cpp/yaml.h>

#include <set>
#include <string>

#include "sd/util/file.h"
#include "stages/catalog.h"

namespace sd {
namespace {

std::set<std::string> DocumentedKeys(const std::string& markdown) {
  std::set<std::string> keys;
  size_t pos = 0;
  while ((pos = markdown.find("```yaml\n", pos)) != std::string::npos) {
    pos += 8;
    const size_t end = markdown.find("```", pos);
    const YAML::Node doc = YAML::Load(markdown.substr(pos, end - pos));
    for (const auto& kv : doc) {
      const std::string k = kv.first.Scalar();
      keys.insert(k);
      if (k != "stages" && kv.second.IsMap()) {
        for (const auto& sub : kv.second) keys.insert(k + "." + sub.first.Scalar());
      }
    }
    pos = end + 3;
  }
  return keys;
}

TEST(JobYamlDocsTest, DocumentedKeysAreExactlyTheParsedOnes) {
  auto text = ReadFile(std::string(SD_SOURCE_DIR) + "/docs/job-yaml.md");
  ASSERT_TRUE(text.ok()) << text.status();
  const std::set<std::string> documented = DocumentedKeys(*text);
  std::set<std::string> parsed;
  for (const auto& [section, keys] : stages::KnownJobKeys()) {
    for (const auto& k : keys) parsed.insert(section.empty() ? k : section + "." + k);
  }
  for (const auto& k : documented)
    EXPECT_TRUE(parsed.contains(k))
        << "docs/job-yaml.md documents \"" << k << "\", which no parser reads";
  for (const auto& k : parsed)
    EXPECT_TRUE(documented.contains(k)) << "\"" << k << "\" is parsed but not in docs/job-yaml.md";
  EXPECT_GT(parsed.size(), 30u);  // the list is the real one, not empty
}

}  // namespace
}  // namespace sd
