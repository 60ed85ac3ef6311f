#include "serve/batcher.h"

#include <gtest/gtest.h>

namespace sd::serve {
namespace {

QueuedRequest Req(uint64_t id, int64_t images, double arrival, int64_t side = 64,
                  int64_t steps = 4) {
  QueuedRequest r;
  r.id = id;
  r.images = images;
  r.height = side;
  r.width = side;
  r.steps = steps;
  r.arrival = arrival;
  r.deadline = arrival + 100;
  return r;
}

BatcherOptions Opts(Batching b, int64_t max_batch = 4, int64_t max_queue = 8) {
  BatcherOptions o;
  o.batching = b;
  o.max_batch_size = max_batch;
  o.max_queue = max_queue;
  o.max_queue_delay_s = 0.5;
  return o;
}

RunningBatch Running(int64_t images, int64_t side = 64, int64_t steps = 4) {
  return {images, side, side, steps};
}

using Ids = std::vector<uint64_t>;

TEST(Batcher, BoundedQueueRefusesCleanly) {
  Batcher b(Opts(Batching::kContinuous, 4, 2));
  ASSERT_TRUE(b.Enqueue(Req(1, 1, 0)).ok());
  ASSERT_TRUE(b.Enqueue(Req(2, 1, 0)).ok());
  absl::Status s = b.Enqueue(Req(3, 1, 0));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(b.depth(), 2);
  EXPECT_EQ(b.Enqueue(Req(4, 5, 0)).code(), absl::StatusCode::kInvalidArgument);
}

TEST(Batcher, NoneRunsOneRequestAtATime) {
  Batcher b(Opts(Batching::kNone));
  for (uint64_t i = 1; i <= 3; ++i) ASSERT_TRUE(b.Enqueue(Req(i, 1, 0)).ok());
  EXPECT_EQ(b.Admit(0, Running(0)).admit, Ids({1}));
  EXPECT_TRUE(b.Admit(0, Running(1)).admit.empty());
  EXPECT_EQ(b.Admit(0, Running(0)).admit, Ids({2}));
}

TEST(Batcher, ContinuousJoinsTheRunningBatchUpToItsSize) {
  Batcher b(Opts(Batching::kContinuous, 4));
  ASSERT_TRUE(b.Enqueue(Req(1, 2, 0)).ok());
  EXPECT_EQ(b.Admit(0, Running(0)).admit, Ids({1}));
  // Arrivals while it runs join at the next step boundary, another step count too.
  ASSERT_TRUE(b.Enqueue(Req(2, 1, 1, 64, 50)).ok());
  ASSERT_TRUE(b.Enqueue(Req(3, 2, 1)).ok());
  EXPECT_EQ(b.Admit(1, Running(2)).admit, Ids({2}));  // 3 does not fit: 2 + 1 + 2 > 4
  EXPECT_EQ(b.depth(), 1);
  EXPECT_TRUE(b.Admit(1, Running(3)).admit.empty());
  EXPECT_EQ(b.Admit(2, Running(2)).admit, Ids({3}));
}

TEST(Batcher, ContinuousKeepsArrivalOrderAcrossResolutions) {
  Batcher b(Opts(Batching::kContinuous, 8));
  ASSERT_TRUE(b.Enqueue(Req(1, 1, 0, 128)).ok());  // another resolution than the running one
  ASSERT_TRUE(b.Enqueue(Req(2, 1, 0, 64)).ok());
  // Request 2 would fit, but letting it pass would starve request 1 behind a
  // stream of 64x64 requests: the batch drains first.
  EXPECT_TRUE(b.Admit(0, Running(2, 64)).admit.empty());
  EXPECT_EQ(b.Admit(0, Running(0)).admit, Ids({1}));
  EXPECT_TRUE(b.Admit(0, Running(1, 128)).admit.empty());
}

TEST(Batcher, DynamicWaitsForTheDelayThenTakesWhatShares) {
  BatcherOptions o = Opts(Batching::kDynamic, 4);
  Batcher b(o);
  ASSERT_TRUE(b.Enqueue(Req(1, 1, 10.0)).ok());
  ASSERT_TRUE(b.Enqueue(Req(2, 1, 10.1, 64, 8)).ok());  // other step count: not this batch
  ASSERT_TRUE(b.Enqueue(Req(3, 1, 10.2)).ok());
  Admission a = b.Admit(10.2, Running(0));
  EXPECT_TRUE(a.admit.empty());
  EXPECT_DOUBLE_EQ(a.wake_at, 10.5);
  EXPECT_EQ(b.Admit(10.5, Running(0)).admit, Ids({1, 3}));
  // A dynamic batch runs to its end: nothing joins it.
  ASSERT_TRUE(b.Enqueue(Req(4, 1, 10.6, 64, 8)).ok());
  EXPECT_TRUE(b.Admit(20, Running(2)).admit.empty());
  EXPECT_EQ(b.Admit(20, Running(0)).admit, Ids({2, 4}));
}

TEST(Batcher, DynamicStartsAtOnceWhenFullOrAtAPreferredSize) {
  BatcherOptions o = Opts(Batching::kDynamic, 4);
  o.preferred_batch_sizes = {2};
  Batcher b(o);
  ASSERT_TRUE(b.Enqueue(Req(1, 1, 0)).ok());
  EXPECT_TRUE(b.Admit(0, Running(0)).admit.empty());
  ASSERT_TRUE(b.Enqueue(Req(2, 1, 0)).ok());
  EXPECT_EQ(b.Admit(0, Running(0)).admit, Ids({1, 2}));
  Batcher full(Opts(Batching::kDynamic, 4));
  ASSERT_TRUE(full.Enqueue(Req(1, 3, 0)).ok());
  ASSERT_TRUE(full.Enqueue(Req(2, 1, 0)).ok());
  EXPECT_EQ(full.Admit(0, Running(0)).admit, Ids({1, 2}));
}

TEST(Batcher, ExpiredAndCancelledLeaveTheQueue) {
  Batcher b(Opts(Batching::kContinuous));
  QueuedRequest r = Req(1, 1, 0);
  r.deadline = 5;
  ASSERT_TRUE(b.Enqueue(r).ok());
  ASSERT_TRUE(b.Enqueue(Req(2, 1, 0)).ok());
  EXPECT_TRUE(b.TakeExpired(4).empty());
  EXPECT_EQ(b.TakeExpired(5), Ids({1}));
  EXPECT_TRUE(b.Remove(2));
  EXPECT_FALSE(b.Remove(2));
  EXPECT_EQ(b.depth(), 0);
}

TEST(Batcher, OptionsAreChecked) {
  EXPECT_FALSE(ParseBatching("fifo").ok());
  EXPECT_EQ(*ParseBatching("dynamic"), Batching::kDynamic);
  BatcherOptions o;
  o.max_batch_size = 4;
  o.preferred_batch_sizes = {8};
  absl::Status s = ValidateBatcherOptions(o);
  EXPECT_NE(s.message().find("--preferred-batch-sizes"), std::string::npos) << s;
  o.preferred_batch_sizes.clear();
  o.max_queue = 0;
  EXPECT_NE(ValidateBatcherOptions(o).message().find("--max-queue"), std::string::npos);
}

}  // namespace
}  // namespace sd::serve
