// Chat formatting with tools (llama.cpp's common/chat): the templates a
// Session reads from its model, a rendered chat (ChatPrompt) and the parser
// that reads an answer back into content and tool calls.
#include <memory>
#include <string>

#include "bind_common.h"
#include "chat_format.h"

namespace slot::bind {

void bind_chat(py::module_& m) {
    py::class_<ChatTemplates, std::shared_ptr<ChatTemplates>>(m, "ChatTemplates")
        .def_property_readonly("source", &ChatTemplates::source)
        .def_property_readonly("supports_tools", &ChatTemplates::supports_tools)
        .def_property_readonly("jinja", &ChatTemplates::jinja);

    py::class_<ChatPrompt>(m, "ChatPrompt")
        .def_readonly("prompt", &ChatPrompt::prompt)
        .def_readonly("answer_prefix", &ChatPrompt::answer_prefix)
        .def_readonly("format", &ChatPrompt::format)
        .def_readonly("grammar", &ChatPrompt::grammar)
        .def_readonly("grammar_lazy", &ChatPrompt::grammar_lazy)
        .def_readonly("trigger_patterns", &ChatPrompt::trigger_patterns)
        .def_readonly("trigger_tokens", &ChatPrompt::trigger_tokens)
        .def_readonly("preserved_tokens", &ChatPrompt::preserved_tokens)
        .def_readonly("stops", &ChatPrompt::stops)
        .def_readonly("grammar_prefill", &ChatPrompt::grammar_prefill)
        .def_readonly("needs_parser", &ChatPrompt::needs_parser)
        .def_readonly("thinking_end", &ChatPrompt::thinking_end)
        .def_readonly("thinking_forced_open", &ChatPrompt::thinking_forced_open);

    py::class_<ChatParser>(m, "ChatParser")
        .def(py::init([](const ChatPrompt& prompt, bool parse_tool_calls) {
                 return std::make_unique<ChatParser>(prompt.syntax, parse_tool_calls);
             }),
             py::arg("prompt"), py::arg("parse_tool_calls"))
        .def(
            "update",
            [](ChatParser& p, const std::string& text, bool partial) {
                return without_gil([&] { return p.update(text, partial); });
            },
            py::arg("text"), py::arg("partial"));
}

}  // namespace slot::bind
