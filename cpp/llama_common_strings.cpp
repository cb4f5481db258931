// The four string helpers that llama.cpp's common/json-schema-to-grammar
// needs from common/common.cpp, which the extension does not build (it would
// bring in the whole common library).
#include <cstdarg>
#include <cstdio>
#include <string>
#include <vector>

std::string string_format(const char* fmt, ...) {
    va_list args;
    va_start(args, fmt);
    va_list again;
    va_copy(again, args);
    const int size = std::vsnprintf(nullptr, 0, fmt, args);
    va_end(args);
    std::string out;
    if (size > 0) {
        out.resize(static_cast<size_t>(size) + 1);
        std::vsnprintf(&out[0], out.size(), fmt, again);
        out.resize(static_cast<size_t>(size));
    }
    va_end(again);
    return out;
}

std::string string_join(const std::vector<std::string>& values, const std::string& separator) {
    std::string out;
    for (size_t i = 0; i < values.size(); ++i) {
        if (i > 0) out += separator;
        out += values[i];
    }
    return out;
}

std::vector<std::string> string_split(const std::string& str, const std::string& delimiter) {
    std::vector<std::string> parts;
    if (delimiter.empty()) {
        parts.push_back(str);
        return parts;
    }
    size_t start = 0;
    for (size_t at = str.find(delimiter); at != std::string::npos; at = str.find(delimiter, start)) {
        parts.push_back(str.substr(start, at - start));
        start = at + delimiter.size();
    }
    parts.push_back(str.substr(start));
    return parts;
}

std::string string_repeat(const std::string& str, size_t n) {
    std::string out;
    out.reserve(str.size() * n);
    for (size_t i = 0; i < n; ++i) out += str;
    return out;
}
