// sha256.hpp: SHA-256 of a file (FIPS 180-4), so that libcqil checks an engine's files as the Python
// runtime does without depending on OpenSSL.
#pragma once

#include <string>

namespace cqil::rt {

// Lowercase hex digest of the file at `path`; throws cqil::Error when it cannot be read.
std::string sha256_file(const std::string& path);

}  // namespace cqil::rt
