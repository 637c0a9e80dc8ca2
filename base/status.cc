#include "base/status.h"

#include <cerrno>
#include <ostream>
#include <system_error>

namespace strata {

const char* StatusCodeName(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "OK";
    case StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case StatusCode::kNotFound: return "NOT_FOUND";
    case StatusCode::kAlreadyExists: return "ALREADY_EXISTS";
    case StatusCode::kOutOfRange: return "OUT_OF_RANGE";
    case StatusCode::kDeadlineExceeded: return "DEADLINE_EXCEEDED";
    case StatusCode::kUnavailable: return "UNAVAILABLE";
    case StatusCode::kDataLoss: return "DATA_LOSS";
    case StatusCode::kCorruption: return "CORRUPTION";
    case StatusCode::kResourceExhausted: return "RESOURCE_EXHAUSTED";
    case StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case StatusCode::kUnimplemented: return "UNIMPLEMENTED";
    case StatusCode::kInternal: return "INTERNAL";
    case StatusCode::kAborted: return "ABORTED";
    case StatusCode::kIOError: return "IO_ERROR";
  }
  // Only reachable with a value cast from outside the enum (e.g. read off the wire).
  return "UNKNOWN_STATUS_CODE";
}

Status::Status(StatusCode code, std::string message) : code_(code) {
  if (code != StatusCode::kOk) message_ = std::move(message);
}

std::string Status::ToString() const {
  if (ok()) return "OK";
  if (message_.empty()) return StatusCodeName(code_);
  return fmt::format("{}: {}", StatusCodeName(code_), message_);
}

Status Status::WithContext(std::string_view ctx) const {
  if (ok()) return *this;
  if (message_.empty()) return Status(code_, std::string(ctx));
  return Status(code_, fmt::format("{}: {}", ctx, message_));
}

std::ostream& operator<<(std::ostream& os, StatusCode code) { return os << StatusCodeName(code); }

std::ostream& operator<<(std::ostream& os, const Status& status) { return os << status.ToString(); }

Status ErrnoStatus(std::string_view what, int err) {
  // generic_category().message() is strerror without strerror's shared static buffer.
  std::string message =
      fmt::format("{}: {} (errno {})", what, std::generic_category().message(err), err);
  switch (err) {
    case ECONNRESET:
    case EPIPE:
    case ECONNREFUSED:
    case EHOSTUNREACH:
    case ENETUNREACH: return Status::Unavailable(std::move(message));
    case ETIMEDOUT: return Status::DeadlineExceeded(std::move(message));
    case ENOSPC:
    case EDQUOT: return Status::ResourceExhausted(std::move(message));
    case ENOENT: return Status::NotFound(std::move(message));
    case EINVAL: return Status::InvalidArgument(std::move(message));
    default: return Status::IOError(std::move(message));
  }
}

}  // namespace strata
