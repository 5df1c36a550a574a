#include "errors.hpp"

#include <cstring>

namespace ww {

void throw_os_error(int err, const std::string& context) {
    char buf[256];
    // GNU strerror_r may return a static string instead of filling buf; use what it returns.
    const char* text = strerror_r(err, buf, sizeof buf);
    throw OsError(err, context + ": " + text);
}

}  // namespace ww
