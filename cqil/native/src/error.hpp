// error.hpp: the one exception type inside libcqil; the C API turns it into a status and a line.
#pragma once

#include <stdexcept>
#include <string>

#include "cqil.h"

namespace cqil::rt {

class Error : public std::runtime_error {
 public:
  Error(cqil_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
  cqil_status status() const { return status_; }

 private:
  cqil_status status_;
};

[[noreturn]] inline void fail(cqil_status status, const std::string& message) { throw Error(status, message); }

// The first line of a third-party message (libtorch errors carry pages of C++ context).
inline std::string first_line(const std::string& text, size_t limit = 300) {
  size_t start = text.find_first_not_of(" \t\r\n");
  if (start == std::string::npos) return "unknown error";
  size_t end = text.find_first_of("\r\n", start);
  std::string line = text.substr(start, end == std::string::npos ? std::string::npos : end - start);
  return line.size() > limit ? line.substr(0, limit) : line;
}

}  // namespace cqil::rt
