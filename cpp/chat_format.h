// Chat formatting with tools, by llama.cpp's common/chat: the model's Jinja
// chat template renders the messages and the tool definitions, and the same
// module tells how the model writes a tool call (the grammar that forces or
// allows one, what triggers it, and the parser that reads the answer back).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

struct llama_model;
struct llama_vocab;
struct common_chat_templates;
struct common_chat_parser_params;
struct common_chat_msg;

namespace slot {

// What a chat request asks of the template: OpenAI's JSON for the messages
// and the tools, the tool choice ("auto", "required" or "none"), and how a
// thinking model's reasoning is rendered and read back.
struct ChatRequest {
    std::string messages_json;
    std::string tools_json;  // empty: no tools
    std::string tool_choice = "auto";
    bool parallel_tool_calls = false;
    bool add_generation_prompt = true;
    // llama.cpp's reasoning formats: "none" leaves the reasoning in the
    // content; "auto", "deepseek" and "deepseek-legacy" read it into
    // reasoning_content (this llama.cpp reads the last two alike).
    std::string reasoning_format = "none";
    bool enable_thinking = true;
    // A JSON object of extra template variables (chat_template_kwargs); empty: none.
    std::string template_kwargs_json;
};

// How one format's answers are read back (a loaded parser).
struct ChatSyntax;

// A rendered chat prompt and how to decode and read its answer.
struct ChatPrompt {
    std::string prompt;
    // The end of `prompt` that begins the answer (the call marker when a call
    // is required); the parser reads it before the answer.
    std::string answer_prefix;
    std::string format;    // the output format's name (llama.cpp's)
    std::string grammar;   // GBNF the answer follows; empty: unconstrained
    // Lazy grammar: it applies only from the first match of a trigger pattern
    // (a regular expression over the answer) or a trigger token.
    bool grammar_lazy = false;
    std::vector<std::string> trigger_patterns;
    std::vector<int32_t> trigger_tokens;
    // Control tokens the answer's text must show (the parser reads them).
    std::vector<int32_t> preserved_tokens;
    std::vector<std::string> stops;
    // Tokens a non-lazy grammar reads first: the generation prompt and the
    // answer prefix, which the prompt already ends with and the grammar spells out.
    std::vector<int32_t> grammar_prefill;
    // Whether the answer needs reading back (tool calls, or reasoning to
    // split off); false: the answer's text is its content as it is.
    bool needs_parser = false;
    // A thinking model's reasoning ends with this tag (empty: it does not
    // think here), after which a grammar of the request's own applies.
    std::string thinking_end;
    // Whether the prompt itself opens the reasoning (the answer begins inside it).
    bool thinking_forced_open = false;
    std::shared_ptr<const ChatSyntax> syntax;
};

struct ChatTemplatesFree {
    void operator()(common_chat_templates* t) const;
};

// The model's chat templates (or an override), parsed once; independent of
// the model once built.
//
// A template that cannot write tool calls (a built-in one, or a Jinja
// template without tool support) still takes tools: they are described in a
// system message and a call is a JSON object {"name": ..., "arguments": {...}},
// forced by a grammar for "required" (format "json-call").
class ChatTemplates {
public:
    // `source`: a Jinja template to use instead of the model's (empty: the
    // model's own, or llama.cpp's ChatML default when it has none); with
    // `jinja` false, the name of one of llama.cpp's built-in templates.
    ChatTemplates(const llama_model* model, const std::string& source, bool jinja);

    // std::invalid_argument naming the problem for messages or tools the
    // template cannot render. `vocab` (the model's) tokenizes trigger words.
    ChatPrompt apply(const llama_vocab* vocab, const ChatRequest& request) const;
    std::string source() const;
    bool supports_tools() const;
    bool jinja() const { return jinja_; }

private:
    std::unique_ptr<common_chat_templates, ChatTemplatesFree> templates_;
    bool jinja_ = true;
};

// Reads one answer, whole or as it grows: the message so far and what changed
// since the previous call (OpenAI's streamed deltas). Tool calls get ids
// that stay the same from call to call.
class ChatParser {
public:
    ChatParser(std::shared_ptr<const ChatSyntax> syntax, bool parse_tool_calls);
    ~ChatParser();

    // JSON: {"message": {role, content, tool_calls?}, "deltas": [{content?, tool_call_index?,
    // tool_call?: {id, name, arguments}}]}. An answer that does not parse in
    // the format (partial = false) is read as plain content.
    std::string update(const std::string& text, bool partial);

private:
    std::shared_ptr<const ChatSyntax> syntax_;
    // The syntax's parser settings with this answer's parse_tool_calls,
    // copied once (the loaded parser is too large to copy per piece).
    std::unique_ptr<common_chat_parser_params> params_;
    std::unique_ptr<common_chat_msg> previous_;
    std::vector<std::string> ids_;
};

}  // namespace slot
