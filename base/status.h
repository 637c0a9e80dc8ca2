// Status and StatusOr<T>: the result of everything that can fail at run time (network, files,
// peers, snapshots, user input). Programming errors use STRATA_CHECK instead (base/check.h).
#pragma once

#include <concepts>
#include <iosfwd>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include <fmt/format.h>

#include "base/check.h"

namespace strata {

enum class StatusCode {
  kOk,
  kInvalidArgument,
  kNotFound,
  kAlreadyExists,
  kOutOfRange,
  kDeadlineExceeded,
  kUnavailable,  // transient: a peer or link is down; retrying may succeed
  kDataLoss,
  kCorruption,  // data was read but failed a checksum or format check
  kResourceExhausted,
  kFailedPrecondition,
  kUnimplemented,
  kInternal,
  kAborted,
  kIOError,
};

// "OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", ...
const char* StatusCodeName(StatusCode code);

class [[nodiscard]] Status {
 public:
  Status() = default;  // OK
  // An OK code drops the message, so every OK status compares equal.
  Status(StatusCode code, std::string message);

  static Status OK() { return Status(); }
  static Status InvalidArgument(std::string msg) {
    return Status(StatusCode::kInvalidArgument, std::move(msg));
  }
  static Status NotFound(std::string msg) { return Status(StatusCode::kNotFound, std::move(msg)); }
  static Status AlreadyExists(std::string msg) {
    return Status(StatusCode::kAlreadyExists, std::move(msg));
  }
  static Status OutOfRange(std::string msg) {
    return Status(StatusCode::kOutOfRange, std::move(msg));
  }
  static Status DeadlineExceeded(std::string msg) {
    return Status(StatusCode::kDeadlineExceeded, std::move(msg));
  }
  static Status Unavailable(std::string msg) {
    return Status(StatusCode::kUnavailable, std::move(msg));
  }
  static Status DataLoss(std::string msg) { return Status(StatusCode::kDataLoss, std::move(msg)); }
  static Status Corruption(std::string msg) {
    return Status(StatusCode::kCorruption, std::move(msg));
  }
  static Status ResourceExhausted(std::string msg) {
    return Status(StatusCode::kResourceExhausted, std::move(msg));
  }
  static Status FailedPrecondition(std::string msg) {
    return Status(StatusCode::kFailedPrecondition, std::move(msg));
  }
  static Status Unimplemented(std::string msg) {
    return Status(StatusCode::kUnimplemented, std::move(msg));
  }
  static Status Internal(std::string msg) { return Status(StatusCode::kInternal, std::move(msg)); }
  static Status Aborted(std::string msg) { return Status(StatusCode::kAborted, std::move(msg)); }
  static Status IOError(std::string msg) { return Status(StatusCode::kIOError, std::move(msg)); }

  bool ok() const { return code_ == StatusCode::kOk; }
  StatusCode code() const { return code_; }
  const std::string& message() const { return message_; }

  // "DEADLINE_EXCEEDED: peer 2 did not answer", "NOT_FOUND" (no message), or "OK".
  std::string ToString() const;

  // Same code, message "ctx: old message", so callers up the stack can say what they were doing
  // without losing the code the caller's retry logic looks at. OK stays OK.
  Status WithContext(std::string_view ctx) const;

  // Documents that dropping this status is deliberate.
  void IgnoreError() const {}

  friend bool operator==(const Status&, const Status&) = default;

 private:
  StatusCode code_ = StatusCode::kOk;
  std::string message_;
};

std::ostream& operator<<(std::ostream& os, StatusCode code);
std::ostream& operator<<(std::ostream& os, const Status& status);

// errno -> Status, message "<what>: <strerror> (errno N)". Connection and routing failures map
// to Unavailable (retryable), ETIMEDOUT to DeadlineExceeded, ENOSPC/EDQUOT to ResourceExhausted,
// ENOENT to NotFound, EINVAL to InvalidArgument, everything else to IOError.
Status ErrnoStatus(std::string_view what, int err);

template <class T>
class StatusOr;

namespace internal {
// What StatusOr<T> may be built from besides T itself: anything T can be constructed from that is
// not a Status, a StatusOr or the in_place tag (those have their own constructors).
template <class U, class T>
concept ValueSource =
    std::is_constructible_v<T, U&&> && !std::is_same_v<std::remove_cvref_t<U>, T> &&
    !std::is_same_v<std::remove_cvref_t<U>, StatusOr<T>> &&
    !std::is_same_v<std::remove_cvref_t<U>, Status> &&
    !std::is_same_v<std::remove_cvref_t<U>, std::in_place_t>;
}  // namespace internal

// A T or a non-OK Status.
template <class T>
class [[nodiscard]] StatusOr {
  static_assert(!std::is_reference_v<T>, "StatusOr<T&> is not supported; use a pointer");
  static_assert(!std::is_same_v<std::remove_cv_t<T>, Status>, "StatusOr<Status> is ambiguous");

 public:
  using value_type = T;

  StatusOr(const T& value) : value_(value) {}        // NOLINT(google-explicit-constructor)
  StatusOr(T&& value) : value_(std::move(value)) {}  // NOLINT(google-explicit-constructor)

  // Anything T can be built from, so `return "name";` works for StatusOr<std::string> and
  // `return std::make_unique<Derived>();` for StatusOr<std::unique_ptr<Base>>. Implicit exactly
  // when the conversion to T is.
  template <internal::ValueSource<T> U>
  explicit(!std::is_convertible_v<U&&, T>) StatusOr(U&& value)  // NOLINT
      : value_(std::in_place, std::forward<U>(value)) {}

  template <class... Args>
  explicit StatusOr(std::in_place_t, Args&&... args)
      : value_(std::in_place, std::forward<Args>(args)...) {}

  // A StatusOr built from a Status is an error; an OK Status here has no value to go with it.
  StatusOr(const Status& status) : status_(status) { CheckNotOk(); }        // NOLINT
  StatusOr(Status&& status) : status_(std::move(status)) { CheckNotOk(); }  // NOLINT

  StatusOr(const StatusOr&) = default;
  StatusOr(StatusOr&&) = default;
  StatusOr& operator=(const StatusOr&) = default;
  StatusOr& operator=(StatusOr&&) = default;

  bool ok() const { return value_.has_value(); }
  // OK when holding a value.
  const Status& status() const { return status_; }

  T& value() & {
    CheckOk();
    return *value_;
  }
  const T& value() const& {
    CheckOk();
    return *value_;
  }
  T&& value() && {
    CheckOk();
    return std::move(*value_);
  }

  template <class U>
  T value_or(U&& fallback) const& {
    return ok() ? *value_ : static_cast<T>(std::forward<U>(fallback));
  }
  template <class U>
  T value_or(U&& fallback) && {
    return ok() ? std::move(*value_) : static_cast<T>(std::forward<U>(fallback));
  }

  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

 private:
  void CheckNotOk() const {
    STRATA_CHECK_MSG(!status_.ok(), "StatusOr constructed from an OK Status without a value");
  }
  void CheckOk() const {
    STRATA_CHECK_MSG(ok(), "StatusOr::value() on an error: {}", status_.ToString());
  }

  Status status_;
  std::optional<T> value_;
};

namespace internal {
inline const Status& StatusOf(const Status& s) { return s; }
template <class T>
const Status& StatusOf(const StatusOr<T>& s) {
  return s.status();
}
}  // namespace internal

}  // namespace strata

template <>
struct fmt::formatter<strata::StatusCode> : fmt::formatter<std::string_view> {
  auto format(strata::StatusCode code, fmt::format_context& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(strata::StatusCodeName(code), ctx);
  }
};

template <>
struct fmt::formatter<strata::Status> : fmt::formatter<std::string_view> {
  auto format(const strata::Status& s, fmt::format_context& ctx) const -> decltype(ctx.out()) {
    return fmt::formatter<std::string_view>::format(s.ToString(), ctx);
  }
};

#define STRATA_INTERNAL_CONCAT_INNER(a, b) a##b
#define STRATA_INTERNAL_CONCAT(a, b) STRATA_INTERNAL_CONCAT_INNER(a, b)

// Evaluates `expr` (a Status or StatusOr) once and returns its Status from the enclosing function
// if it is not OK.
#define STRATA_RETURN_IF_ERROR(expr)                           \
  do {                                                         \
    auto&& strata_rie_result_ = (expr);                        \
    if (!strata_rie_result_.ok()) [[unlikely]] {               \
      return ::strata::internal::StatusOf(strata_rie_result_); \
    }                                                          \
  } while (0)

// STRATA_ASSIGN_OR_RETURN(auto x, Foo());  STRATA_ASSIGN_OR_RETURN(existing, Foo());
// Evaluates the StatusOr expression once; on error returns its Status, else moves the value into
// `lhs`. Expands to several statements, so it cannot be the body of an unbraced if. `lhs` must not
// contain unparenthesized commas; the expression may.
#define STRATA_ASSIGN_OR_RETURN(lhs, ...)                                                     \
  STRATA_INTERNAL_ASSIGN_OR_RETURN(STRATA_INTERNAL_CONCAT(strata_aor_result_, __LINE__), lhs, \
                                   __VA_ARGS__)
#define STRATA_INTERNAL_ASSIGN_OR_RETURN(tmp, lhs, ...) \
  auto tmp = (__VA_ARGS__);                             \
  if (!tmp.ok()) [[unlikely]] {                         \
    return tmp.status();                                \
  }                                                     \
  lhs = std::move(tmp).value()
