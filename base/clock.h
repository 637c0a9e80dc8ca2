// Monotonic time and deadlines. Everything here uses std::chrono::steady_clock, so wall-clock
// adjustments never make a timeout fire early or late.
#pragma once

#include <chrono>
#include <cstdint>
#include <limits>

namespace strata {

// Nanoseconds on the steady clock (arbitrary epoch): for intervals, never for dates.
inline int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A point in steady time by which an operation must finish, passed down so that nested waits share
// one budget instead of each restarting a timeout.
class Deadline {
 public:
  // Saturates instead of overflowing for huge durations; a negative one is already expired.
  static Deadline After(std::chrono::nanoseconds d) {
    int64_t now = NowNs();
    int64_t delta = d.count();
    if (delta > 0 && now > kNever - delta) return Deadline(kNever - 1);
    return Deadline(now + delta);
  }
  static Deadline Never() { return Deadline(kNever); }

  bool is_never() const { return at_ns_ == kNever; }
  bool expired() const { return !is_never() && NowNs() >= at_ns_; }

  // >= 0; nanoseconds::max() for Never.
  std::chrono::nanoseconds remaining() const {
    if (is_never()) return std::chrono::nanoseconds::max();
    int64_t left = at_ns_ - NowNs();
    return std::chrono::nanoseconds(left > 0 ? left : 0);
  }

  // The timeout argument for poll()/epoll_wait(): -1 (wait forever) for Never, otherwise the
  // remaining time rounded up to whole milliseconds, so a poll never returns before the deadline
  // and then spins with a zero timeout. Capped at INT32_MAX so it fits poll's int.
  int64_t remaining_ms_for_poll() const {
    if (is_never()) return -1;
    int64_t ns = remaining().count();
    int64_t ms = ns / 1000000 + (ns % 1000000 != 0 ? 1 : 0);
    return ms < std::numeric_limits<int32_t>::max() ? ms : std::numeric_limits<int32_t>::max();
  }

  // Steady-clock nanoseconds (as NowNs()); INT64_MAX for Never.
  int64_t at_ns() const { return at_ns_; }

 private:
  static constexpr int64_t kNever = std::numeric_limits<int64_t>::max();
  explicit Deadline(int64_t at_ns) : at_ns_(at_ns) {}

  int64_t at_ns_;
};

}  // namespace strata
