#include "chat_format.h"

#include <algorithm>
#include <cctype>
#include <random>
#include <stdexcept>

#include "chat.h"  // llama.cpp's common/chat.h
#include "common.h"
#include "json-schema-to-grammar.h"
#include "llama.h"

namespace slot {

struct ChatSyntax {
    common_chat_parser_params params;
    std::string answer_prefix;  // the end of the prompt that belongs to the answer
    bool one_call = false;      // parallel_tool_calls off: the first call is the answer's
    bool json_calls = false;    // the "json-call" format (a template without tool support)
};

void ChatTemplatesFree::operator()(common_chat_templates* t) const { common_chat_templates_free(t); }

ChatTemplates::ChatTemplates(const llama_model* model, const std::string& source, bool jinja) : jinja_(jinja) {
    try {
        templates_.reset(common_chat_templates_init(model, source).release());
    } catch (const std::exception& e) {
        throw std::invalid_argument(std::string("the chat template cannot be parsed: ") + e.what());
    }
    if (!templates_) throw std::invalid_argument("the chat template cannot be parsed");
}

std::string ChatTemplates::source() const { return common_chat_templates_source(templates_.get()); }

bool ChatTemplates::supports_tools() const {
    const auto caps = common_chat_templates_get_caps(templates_.get());
    const auto it = caps.find("supports_tool_calls");
    return it != caps.end() && it->second;
}

namespace {

common_json parse_json(const std::string& text, const char* what) {
    try {
        return common_json::parse(text);
    } catch (const std::exception& e) {
        throw std::invalid_argument(std::string(what) + " is not valid JSON: " + e.what());
    }
}

// One token for `text` when the vocabulary has it as a single (special) token.
bool single_token(const llama_vocab* vocab, const std::string& text, int32_t& token) {
    const auto ids = common_tokenize(vocab, text, /*add_special=*/false, /*parse_special=*/true);
    if (ids.size() != 1) return false;
    token = ids[0];
    return true;
}

bool is_json(const std::string& text) {
    try {
        common_json::parse(text);
        return true;
    } catch (const std::exception&) {
        return false;
    }
}

std::string random_call_id() {
    static const char alphabet[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    thread_local std::mt19937_64 rng{std::random_device{}()};
    std::uniform_int_distribution<int> pick(0, sizeof(alphabet) - 2);
    std::string id = "call_";
    for (int i = 0; i < 24; ++i) id += alphabet[pick(rng)];
    return id;
}

// ---- tools for a template that cannot write calls ("json-call") ----
// The tools are described in a system message; a call is one JSON object
// {"name": ..., "arguments": {...}}. Calls and results already in the
// history are written as text the template can render.

std::string json_call_instructions(const std::vector<common_chat_tool>& tools, common_chat_tool_choice choice) {
    std::string out =
        "You can call the functions below. To call one, answer with a JSON object and nothing else: "
        "{\"name\": <the function's name>, \"arguments\": {<its arguments>}}.";
    out += choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED ? " Answer with a call."
                                                       : " If no function helps, answer in plain text.";
    out += "\n\nFunctions:";
    for (const auto& t : tools) {
        common_json f = {{"name", t.name}};
        if (!t.description.empty()) f["description"] = t.description;
        f["parameters"] = t.parameters.empty() ? common_json::object() : common_json::parse(t.parameters);
        out += "\n" + f.dump();
    }
    return out;
}

// Call history as text; the tools' instructions as (or in) the system message.
void rewrite_for_json_calls(std::vector<common_chat_msg>& messages, const std::string& instructions) {
    std::vector<std::pair<std::string, std::string>> names;  // call id -> function name
    for (auto& m : messages) {
        if (m.role == "assistant" && !m.tool_calls.empty()) {
            for (const auto& c : m.tool_calls) {
                common_json args;
                try {
                    args = common_json::parse(c.arguments);
                } catch (const std::exception&) {
                    args = c.arguments;
                }
                if (!m.content.empty()) m.content += "\n";
                m.content += common_json{{"name", c.name}, {"arguments", args}}.dump();
                names.emplace_back(c.id, c.name);
            }
            m.tool_calls.clear();
        } else if (m.role == "tool") {
            std::string name = m.tool_name;
            for (const auto& [id, n] : names) {
                if (name.empty() && !m.tool_call_id.empty() && id == m.tool_call_id) name = n;
            }
            m.role = "user";
            m.content = "The result of " + (name.empty() ? std::string("the call") : name) + ": " + m.render_content();
            m.content_parts.clear();
            m.tool_name.clear();
            m.tool_call_id.clear();
        }
    }
    // Results written as user turns next to each other (or to the user's next
    // message) are one turn: templates without tools often insist that turns alternate.
    std::vector<common_chat_msg> merged;
    for (auto& m : messages) {
        if (!merged.empty() && m.role == "user" && merged.back().role == "user") {
            merged.back().content = merged.back().render_content() + "\n\n" + m.render_content();
            merged.back().content_parts.clear();
            continue;
        }
        merged.push_back(std::move(m));
    }
    messages = std::move(merged);
    if (instructions.empty()) return;
    if (!messages.empty() && messages.front().role == "system") {
        auto& system = messages.front();
        system.content = system.render_content() + "\n\n" + instructions;
        system.content_parts.clear();
    } else {
        common_chat_msg system;
        system.role = "system";
        system.content = instructions;
        messages.insert(messages.begin(), std::move(system));
    }
}

// The grammar of one call to one of `tools`.
std::string json_call_grammar(const std::vector<common_chat_tool>& tools) {
    common_json one_of = common_json::array();
    for (const auto& t : tools) {
        common_json name = common_json::object();
        name["const"] = t.name;
        common_json properties = common_json::object();
        properties["name"] = name;
        properties["arguments"] = t.parameters.empty() ? common_json{{"type", "object"}} : common_json::parse(t.parameters);
        common_json call = common_json::object();
        call["type"] = "object";
        call["properties"] = properties;
        call["required"] = common_json::array({"name", "arguments"});
        call["additionalProperties"] = false;
        one_of.push_back(call);
    }
    common_json schema = common_json::object();
    if (one_of.size() == 1) {
        schema = one_of[0];
    } else {
        schema["oneOf"] = one_of;
    }
    return json_schema_to_grammar(schema);
}

// A json-call answer read back: a whole JSON call, or text.
common_chat_msg parse_json_call(const std::string& text, bool partial, bool parse_calls) {
    common_chat_msg msg;
    msg.role = "assistant";
    const size_t first = text.find_first_not_of(" \t\r\n");
    if (parse_calls && first != std::string::npos && text[first] == '{') {
        try {
            const auto j = common_json::parse(text.substr(first));
            if (j.is_object() && j.contains("name") && j["name"].is_string() && j.contains("arguments")) {
                common_chat_tool_call call;
                call.name = j["name"].get<std::string>();
                call.arguments = j["arguments"].is_string() ? j["arguments"].get<std::string>() : j["arguments"].dump();
                msg.tool_calls.push_back(std::move(call));
                return msg;
            }
        } catch (const std::exception&) {
            if (partial) throw std::runtime_error("a call not yet complete");
        }
    } else if (partial && first == std::string::npos) {
        throw std::runtime_error("nothing yet");  // whitespace: content or a call may follow
    }
    msg.content = text;
    return msg;
}

}  // namespace

ChatPrompt ChatTemplates::apply(const llama_vocab* vocab, const ChatRequest& request) const {
    common_chat_templates_inputs in;
    try {
        in.messages = common_chat_msgs_parse_oaicompat(parse_json(request.messages_json, "messages"));
        if (!request.tools_json.empty()) {
            in.tools = common_chat_tools_parse_oaicompat(parse_json(request.tools_json, "tools"));
        }
        in.tool_choice = common_chat_tool_choice_parse_oaicompat(request.tool_choice);
        in.reasoning_format = common_reasoning_format_from_name(request.reasoning_format);
        if (!request.template_kwargs_json.empty()) {
            const auto kwargs = parse_json(request.template_kwargs_json, "chat_template_kwargs");
            if (!kwargs.is_object()) throw std::invalid_argument("chat_template_kwargs must be a JSON object");
            for (const auto& [key, value] : kwargs.items()) in.chat_template_kwargs[key] = value.dump();
        }
    } catch (const std::invalid_argument&) {
        throw;
    } catch (const std::exception& e) {
        throw std::invalid_argument(e.what());
    }
    in.parallel_tool_calls = request.parallel_tool_calls;
    in.add_generation_prompt = request.add_generation_prompt;
    in.use_jinja = jinja_;
    in.enable_thinking = request.enable_thinking;
    if (!jinja_) in.reasoning_format = COMMON_REASONING_FORMAT_NONE;  // built-in templates do not think

    // Tools on a template that cannot write calls: the json-call format.
    bool history_has_calls = false;
    for (const auto& m : in.messages) history_has_calls |= m.role == "tool" || !m.tool_calls.empty();
    const bool json_calls = !(jinja_ && supports_tools()) && (!in.tools.empty() || history_has_calls);
    std::vector<common_chat_tool> call_tools;
    common_chat_tool_choice call_choice = COMMON_CHAT_TOOL_CHOICE_NONE;
    if (json_calls) {
        if (in.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE) call_tools = in.tools;
        call_choice = call_tools.empty() ? COMMON_CHAT_TOOL_CHOICE_NONE : in.tool_choice;
        try {
            rewrite_for_json_calls(in.messages, call_tools.empty() ? "" : json_call_instructions(call_tools, call_choice));
        } catch (const std::exception& e) {
            throw std::invalid_argument(std::string("tools: ") + e.what());
        }
        in.tools.clear();
        in.tool_choice = COMMON_CHAT_TOOL_CHOICE_NONE;
    }

    common_chat_params params;
    try {
        params = common_chat_templates_apply(templates_.get(), in);
    } catch (const std::exception& e) {
        throw std::invalid_argument(std::string("the chat template could not format these messages: ") + e.what());
    }

    // "required": llama.cpp's grammar lets text come before the first call
    // and only forbids ending without one; a small model may then talk until
    // max_tokens. The answer is begun with the call marker instead (the word
    // that triggers auto's lazy grammar), as OpenAI's required answers hold
    // calls only.
    std::string answer_prefix;
    if (in.tool_choice == COMMON_CHAT_TOOL_CHOICE_REQUIRED && !params.grammar.empty() && !params.grammar_lazy) {
        common_chat_templates_inputs probe = in;
        probe.tool_choice = COMMON_CHAT_TOOL_CHOICE_AUTO;
        try {
            for (const auto& t : common_chat_templates_apply(templates_.get(), probe).grammar_triggers) {
                if (t.type == COMMON_GRAMMAR_TRIGGER_TYPE_WORD) {
                    answer_prefix = t.value;
                    break;
                }
            }
        } catch (const std::exception&) {
            answer_prefix.clear();  // keep llama.cpp's grammar as it is
        }
    }

    ChatPrompt out;
    out.prompt = params.prompt + answer_prefix;
    out.answer_prefix = answer_prefix;
    out.format = common_chat_format_name(params.format);
    out.grammar = params.grammar;
    out.grammar_lazy = params.grammar_lazy;
    out.stops = params.additional_stops;
    for (const auto& text : params.preserved_tokens) {
        int32_t token;
        if (single_token(vocab, text, token)) out.preserved_tokens.push_back(token);
    }
    // As llama.cpp's server and sampler turn triggers into what the lazy
    // grammar sampler takes: a word that is one token triggers on the token.
    for (const auto& trigger : params.grammar_triggers) {
        int32_t token;
        switch (trigger.type) {
            case COMMON_GRAMMAR_TRIGGER_TYPE_WORD:
                if (single_token(vocab, trigger.value, token)) {
                    out.trigger_tokens.push_back(token);
                    out.preserved_tokens.push_back(token);
                } else {
                    out.trigger_patterns.push_back(regex_escape(trigger.value));
                }
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN:
                out.trigger_patterns.push_back(trigger.value);
                break;
            case COMMON_GRAMMAR_TRIGGER_TYPE_PATTERN_FULL: {
                const std::string& p = trigger.value;
                out.trigger_patterns.push_back(p.empty() ? "^$"
                                                         : (p.front() != '^' ? "^" : "") + p +
                                                               (p.back() != '$' ? "$" : ""));
                break;
            }
            case COMMON_GRAMMAR_TRIGGER_TYPE_TOKEN:
                out.trigger_tokens.push_back(trigger.token);
                break;
        }
    }
    const std::string read_first = params.generation_prompt + answer_prefix;
    if (!params.grammar.empty() && !params.grammar_lazy && !read_first.empty()) {
        const auto ids = common_tokenize(vocab, read_first, false, true);
        for (size_t i = 0; i < ids.size(); ++i) {
            const std::string piece = common_token_to_piece(vocab, ids[i], true);
            // Some tokenizers put a space before a leading special token.
            if (i == 0 && !piece.empty() && std::isspace(static_cast<unsigned char>(piece[0])) &&
                !std::isspace(static_cast<unsigned char>(read_first[0]))) {
                continue;
            }
            out.grammar_prefill.push_back(ids[i]);
        }
    }
    const bool thinks = params.supports_thinking && in.reasoning_format != COMMON_REASONING_FORMAT_NONE;
    if (thinks && in.enable_thinking && !params.thinking_end_tags.empty()) {
        out.thinking_end = params.thinking_end_tags[0];
        const auto last = params.generation_prompt.find_last_not_of(" \t\r\n");
        const std::string& open = params.thinking_start_tag;
        out.thinking_forced_open = !open.empty() && last != std::string::npos && last + 1 >= open.size() &&
                                   params.generation_prompt.compare(last + 1 - open.size(), open.size(), open) == 0;
    }
    out.needs_parser = !params.parser.empty() && (thinks || (!in.tools.empty() && in.tool_choice != COMMON_CHAT_TOOL_CHOICE_NONE));
    if (json_calls && !call_tools.empty()) {
        out.format = "json-call";
        out.needs_parser = true;
        try {
            out.grammar = json_call_grammar(call_tools);
        } catch (const std::exception& e) {
            throw std::invalid_argument(std::string("tools: a function's parameters cannot be made a grammar: ") +
                                        e.what());
        }
        out.grammar_lazy = call_choice != COMMON_CHAT_TOOL_CHOICE_REQUIRED;
        if (out.grammar_lazy) out.trigger_patterns = {"^\\s*(\\{[\\s\\S]*)$"};  // an answer that begins with '{'
    }
    auto syntax = std::make_shared<ChatSyntax>();
    syntax->params = common_chat_parser_params(params);
    syntax->params.reasoning_format = in.reasoning_format;
    syntax->answer_prefix = answer_prefix;
    syntax->one_call = !request.parallel_tool_calls;
    syntax->json_calls = out.format == "json-call";
    if (!params.parser.empty()) {
        try {
            syntax->params.parser.load(params.parser);
        } catch (const std::exception& e) {
            throw std::runtime_error(std::string("llama.cpp's chat parser could not be loaded: ") + e.what());
        }
    }
    out.syntax = std::move(syntax);
    return out;
}

ChatParser::ChatParser(std::shared_ptr<const ChatSyntax> syntax, bool parse_tool_calls)
    : syntax_(std::move(syntax)),
      params_(std::make_unique<common_chat_parser_params>(syntax_->params)),
      previous_(std::make_unique<common_chat_msg>()) {
    params_->parse_tool_calls = parse_tool_calls;
    previous_->role = "assistant";
}

ChatParser::~ChatParser() = default;

std::string ChatParser::update(const std::string& text, bool partial) {
    // A partial answer that cannot be read yet: the message so far, nothing new.
    const auto unchanged = [&] {
        return common_json{{"message", previous_->to_json_oaicompat()}, {"deltas", common_json::array()}}.dump();
    };
    common_chat_msg msg;
    try {
        msg = syntax_->json_calls ? parse_json_call(text, partial, params_->parse_tool_calls)
                                  : common_chat_parse(syntax_->answer_prefix + text, partial, *params_);
    } catch (const std::exception&) {
        // Not in the format (a call cut short, say): the answer is its text.
        if (partial) return unchanged();
        msg = common_chat_msg();
        msg.role = "assistant";
        msg.content = syntax_->answer_prefix + text;
    }
    // llama.cpp's grammar lets any number of calls follow each other.
    if (syntax_->one_call && msg.tool_calls.size() > 1) msg.tool_calls.resize(1);
    if (!partial) {
        // A call cut short (max_tokens) is not a call: its arguments are not JSON.
        auto& calls = msg.tool_calls;
        calls.erase(std::remove_if(calls.begin(), calls.end(),
                                   [](const common_chat_tool_call& c) { return !is_json(c.arguments); }),
                    calls.end());
    }
    msg.set_tool_call_ids(ids_, random_call_id);
    common_json deltas = common_json::array();
    // A partial parse may show less than the last one (a marker still being
    // written); deltas only grow the message, so wait for it to catch up.
    try {
        // A finished answer may drop a call the partial reads showed (cut short).
        if (previous_->tool_calls.size() > msg.tool_calls.size()) previous_->tool_calls.resize(msg.tool_calls.size());
        for (const auto& d : common_chat_msg_diff::compute_diffs(*previous_, msg)) {
            common_json delta = common_json::object();
            if (!d.content_delta.empty()) delta["content"] = d.content_delta;
            if (!d.reasoning_content_delta.empty()) delta["reasoning_content"] = d.reasoning_content_delta;
            if (d.tool_call_index != std::string::npos) {
                delta["tool_call_index"] = d.tool_call_index;
                delta["tool_call"] = {{"id", d.tool_call_delta.id},
                                      {"name", d.tool_call_delta.name},
                                      {"arguments", d.tool_call_delta.arguments}};
            }
            deltas.push_back(std::move(delta));
        }
    } catch (const std::exception&) {
        if (partial) return unchanged();
        throw;
    }
    *previous_ = msg;
    return common_json{{"message", msg.to_json_oaicompat()}, {"deltas", std::move(deltas)}}.dump();
}

}  // namespace slot
