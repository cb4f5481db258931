// The session facade: construction and closing, the queue of generate calls
// and the driver role over the batch loop (batcher.h), and the engine's
// tokens, chat templates and file information under the right lock.
#include <cmath>
#include "session.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <stdexcept>
#include <thread>

#include "batcher.h"
#include "errors.h"

namespace slot {

Session::Session(const EngineParams& params, const std::string& draft_model)
    : engine_(std::make_unique<Engine>(params)) {
    if (!draft_model.empty()) drafter_ = std::make_unique<Drafter>(draft_model, *engine_);
    shape_ = {engine_->vocab(),         engine_->n_vocab(),      engine_->n_embd(), engine_->n_ctx(),
              engine_->n_parallel(),    engine_->seq_capacity(), engine_->deterministic(),
              engine_->n_adapters(),    engine_->recurrent()};
    const char* portable = std::getenv("SLOT_CPP_PORTABLE_HEAD_OPS");
    portable_head_ops_ = portable != nullptr && std::string(portable) == "1";
}

ggml_backend_dev_t head_device(const EngineParams& params) {
    // With RPC servers the layers are remote; the head products stay local
    // (the head is read from the local file), on the CPU.
    if (params.n_gpu_layers == 0 || !params.rpc_servers.empty()) return nullptr;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        const auto type = ggml_backend_dev_type(dev);
        if (type == GGML_BACKEND_DEVICE_TYPE_GPU || type == GGML_BACKEND_DEVICE_TYPE_IGPU) return dev;
    }
    return nullptr;
}

bool Session::closed() const {
    std::lock_guard<FairMutex> lock(mutex_);
    return !engine_;
}

Engine& Session::engine() {
    if (!engine_) throw Error("the model is closed");
    return *engine_;
}

OutputHead& Session::head() {
    Engine& e = engine();
    if (!head_) {
        const ModelFileInfo& info = e.file_info();
        const std::string reason = info.slot_unsupported_reason();
        if (!reason.empty()) throw UnsupportedModelError("SLOT cannot be applied exactly: " + reason);
        if (info.head.ne0 != e.n_embd() || info.head.ne1 != e.n_vocab()) {
            throw UnsupportedModelError("the output head's shape (" + std::to_string(info.head.ne1) + " x " +
                                        std::to_string(info.head.ne0) + ") does not match the model (" +
                                        std::to_string(e.n_vocab()) + " x " + std::to_string(e.n_embd()) + ")");
        }
        auto backend = std::make_unique<ComputeBackend>(e.n_threads(), head_device(e.params()));
        head_ = std::make_unique<OutputHead>(info, *backend, portable_head_ops_);
        backend_ = std::move(backend);
    }
    return *head_;
}

Session::~Session() = default;

void Session::close() {
    closed_.store(true);
    BatchEvents ev;
    {
        std::lock_guard<FairMutex> lock(mutex_);
        if (batcher_) batcher_->fail_all(std::make_exception_ptr(Error("the model was closed")), ev);
        std::unique_lock<std::shared_mutex> life(life_);  // waits for tokenising calls
        batcher_.reset();
        drafter_.reset();
        head_.reset();
        backend_.reset();
        engine_.reset();
    }
    publish(ev);
}

void Session::publish(BatchEvents& ev) {
    if (ev.finished.empty()) return;
    {
        std::lock_guard<std::mutex> lock(jobs_mutex_);
        for (const auto& j : ev.finished) {
            if (j->counted_waiting) { j->counted_waiting = false; --waiting_; }
            j->done = true;
        }
    }
    jobs_cv_.notify_all();
    ev = BatchEvents();
}

Batcher& Session::batcher() {
    Engine& e = engine();
    if (!batcher_) {
        batcher_ = std::make_unique<Batcher>(
            e, drafter_.get(), [this]() -> OutputHead& { return head(); }, counters_, [this](const std::shared_ptr<BatchJob>& job) {
                std::lock_guard<std::mutex> lock(jobs_mutex_);
                if (job->counted_waiting) { job->counted_waiting = false; --waiting_; }
            });
    }
    return *batcher_;
}

void Session::require_idle(const char* what) {
    if (batcher_ && batcher_->busy()) {
        throw Error(std::string(what) + " cannot run while generate calls are running on this model");
    }
}

void Session::set_max_waiting(int n) {
    if (n < 0) throw std::invalid_argument("max_waiting must be >= 0");
    std::lock_guard<std::mutex> lock(jobs_mutex_);
    max_waiting_ = n;
}

BatchStats Session::stats() {
    BatchStats out;
    const LoopCounters& c = counters_;
    out.live_sequences = c.live_sequences.load();
    out.completed_calls = c.completed_calls.load();
    out.failed_calls = c.failed_calls.load();
    out.generated_tokens = c.generated_tokens.load();
    out.decode_steps = c.decode_steps.load();
    out.prompt_tokens = c.prompt_tokens.load();
    out.cached_tokens = c.cached_tokens.load();
    out.slot_requests = c.slot_requests.load();
    out.rtd_requests = c.rtd_requests.load();
    std::lock_guard<std::mutex> lock(jobs_mutex_);
    out.waiting_requests = waiting_;
    out.failed_calls += cancelled_waiting_;
    return out;
}

std::vector<GenerationResult> Session::generate_batch(const std::vector<GenerationRequest>& requests,
                                                      const BatchTextCallback& on_text,
                                                      const InterruptCheck& interrupted) {
    // Checked without the engine's lock, which a running step holds: the
    // model's shape never changes, and a closed model is caught by the driver.
    if (closed_.load()) throw Error("the model is closed");
    std::shared_ptr<BatchJob> job = make_job(requests);
    job->requests = requests;
    job->on_text = on_text;
    job->interrupted = interrupted;
    job->owner = std::this_thread::get_id();
    enqueue(job);
    if (wait_turn(job, interrupted)) drive(job);
    if (job->error) std::rethrow_exception(job->error);
    return std::move(job->results);
}

std::shared_ptr<BatchJob> Session::make_job(const std::vector<GenerationRequest>& requests) {
    auto job = std::make_shared<BatchJob>();
    const ModelShape& e = shape_;
    if (requests.empty()) throw std::invalid_argument("no requests");
    for (size_t i = 0; i < requests.size(); ++i) {
        const GenerationRequest& req = requests[i];
        validate_request(e, req, requests.size() > 1 ? static_cast<int>(i) : -1);
        if (has_grammar(req)) {
            if (job->grammars.empty()) job->grammars.resize(requests.size());
            job->grammars[i] = parse_grammar(e, req, requests.size() > 1 ? static_cast<int>(i) : -1);
        }
        const int64_t context = static_cast<int64_t>(req.prompt.size() + req.response_prefix.size());
        const int64_t need = cells_needed(req, std::min(req.n, e.n_parallel));
        // Deterministic mode: each sample's sequence holds its own context and tokens.
        const int64_t per_sequence = context + std::max(0, req.max_tokens - 1);
        if (e.deterministic && per_sequence > e.seq_capacity) {
            const std::string where = requests.size() > 1 ? "request " + std::to_string(i) + ": " : "";
            throw ContextLengthError(where + "the prompt has " + std::to_string(context) + " tokens and up to " +
                                     std::to_string(req.max_tokens) + " new tokens need " +
                                     std::to_string(per_sequence) + " KV cells, but in deterministic mode a "
                                     "sequence holds " + std::to_string(e.seq_capacity) + " (n_ctx / n_parallel); "
                                     "use a larger n_ctx, a shorter prompt, or fewer tokens");
        }
        if (context > e.n_ctx || need > e.n_ctx) {
            const std::string where = requests.size() > 1 ? "request " + std::to_string(i) + ": " : "";
            throw ContextLengthError(where + "the prompt has " + std::to_string(context) + " tokens and " +
                                     std::to_string(std::min(req.n, e.n_parallel)) + " sample(s) of up to " +
                                     std::to_string(req.max_tokens) + " new tokens need " + std::to_string(need) +
                                     " KV cells, but the context (shared by all sequences) holds " +
                                     std::to_string(e.n_ctx) + "; use a larger n_ctx, a shorter prompt, or "
                                     "fewer tokens or samples");
        }
    }
    return job;
}

void Session::enqueue(const std::shared_ptr<BatchJob>& job) {
    std::lock_guard<std::mutex> lock(jobs_mutex_);
    if (max_waiting_ > 0 && waiting_ >= max_waiting_) {
        throw QueueFullError("the model already has " + std::to_string(waiting_) +
                             " generate calls waiting for a free sequence (the limit)");
    }
    ++waiting_;
    incoming_.push_back(job);
}

bool Session::wait_turn(const std::shared_ptr<BatchJob>& job, const InterruptCheck& interrupted) {
    // Wait while another caller drives the loop; take over when it stops,
    // unless this call ended meanwhile.
    bool drive = false;
    {
        std::unique_lock<std::mutex> lock(jobs_mutex_);
        while (!job->done && driving_) {
            jobs_cv_.wait_for(lock, std::chrono::milliseconds(20));
            if (!job->done && interrupted) {
                lock.unlock();
                if (interrupted()) job->cancel.store(true);
                lock.lock();
            }
            // Not yet handed to the batcher: leave at once, whatever the driver is doing.
            const auto queued = std::find(incoming_.begin(), incoming_.end(), job);
            if (!job->done && job->cancel.load() && queued != incoming_.end()) {
                incoming_.erase(queued);
                if (job->counted_waiting) { job->counted_waiting = false; --waiting_; }
                if (!job->error) job->error = std::make_exception_ptr(Interrupted());
                job->done = true;
                ++cancelled_waiting_;
            }
        }
        if (!job->done) driving_ = drive = true;
    }
    return drive;
}

void Session::drive(const std::shared_ptr<BatchJob>& job) {
    // Drive until this call ends; the others' calls advance with it.
    BatchEvents ev;
    try {
        for (;;) {
            std::lock_guard<FairMutex> lock(mutex_);
            if (job->finished) break;
            if (!engine_) {
                const auto closed = std::make_exception_ptr(Error("the model is closed"));
                std::lock_guard<std::mutex> jl(jobs_mutex_);
                for (const auto& j : incoming_) {
                    j->error = closed;
                    j->finished = true;
                    ev.finished.push_back(j);
                }
                incoming_.clear();
                break;
            }
            Batcher& b = batcher();
            {
                std::lock_guard<std::mutex> jl(jobs_mutex_);
                for (const auto& j : incoming_) b.add(j);
                incoming_.clear();
            }
            b.tick(ev);
            publish(ev);
        }
    } catch (...) {
        // Not expected (the batcher fails calls, not itself); never leave callers waiting.
        std::lock_guard<FairMutex> lock(mutex_);
        if (!job->finished) {
            job->error = std::current_exception();
            job->finished = true;
            ev.finished.push_back(job);
        }
    }
    publish(ev);
    {
        std::lock_guard<std::mutex> lock(jobs_mutex_);
        driving_ = false;
    }
    jobs_cv_.notify_all();
}

GenerationResult Session::generate(const GenerationRequest& req, const TextCallback& on_text,
                                   const InterruptCheck& interrupted) {
    if (req.n != 1) throw std::invalid_argument("generate() makes one sample; use generate_batch for n > 1");
    BatchTextCallback callback;
    if (on_text) callback = [&on_text](int, const std::string& piece) { return on_text(piece); };
    std::vector<GenerationResult> out = generate_batch({req}, callback, interrupted);
    return std::move(out.front());
}

void Session::clear_cache() {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    if (!batcher_ || !batcher_->busy()) {
        e.clear_all();
        return;
    }
    for (int s = 0; s < e.n_parallel(); ++s) {
        if (!batcher_->live(s)) e.seq_clear(s);
    }
}

int Session::drop_cached(const std::vector<int32_t>& prefix) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    if (prefix.empty()) throw std::invalid_argument("the prefix is empty");
    int dropped = 0;
    for (int s = 0; s < e.n_parallel(); ++s) {
        if (batcher_ && batcher_->live(s)) continue;
        const auto& held = e.seq_tokens(s);
        if (held.size() >= prefix.size() && std::equal(prefix.begin(), prefix.end(), held.begin())) {
            e.seq_clear(s);
            ++dropped;
        }
    }
    return dropped;
}

void Session::use_default_lora(const char* what) {
    Engine& e = engine();
    if (e.lora_scales() == e.default_lora_scales()) return;
    if (batcher_ && batcher_->busy()) {
        throw std::invalid_argument(std::string(what ? what : "this call") +
                                    " needs the LoRA adapters at their default scales, and requests with scales of "
                                    "their own are running; try again when they finish");
    }
    e.set_lora_scales(e.default_lora_scales());
}

std::vector<float> Session::lora_defaults() {
    std::lock_guard<FairMutex> lock(mutex_);
    return engine().default_lora_scales();
}

void Session::set_lora_defaults(const std::vector<float>& scales) {
    std::lock_guard<FairMutex> lock(mutex_);
    for (float s : scales) {
        if (!std::isfinite(s)) throw std::invalid_argument("LoRA scales must be finite");
    }
    engine().set_default_lora_scales(scales);
}

std::vector<Session::SlotInfo> Session::slots() {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    std::vector<SlotInfo> out;
    for (int s = 0; s < e.n_parallel(); ++s) out.push_back({s, batcher_ && batcher_->live(s), e.seq_tokens(s)});
    return out;
}

namespace {
void check_idle_seq(Engine& e, const Batcher* batcher, int seq) {
    if (seq < 0 || seq >= e.n_parallel()) {
        throw std::invalid_argument("slot " + std::to_string(seq) + " does not exist (0 to " +
                                    std::to_string(e.n_parallel() - 1) + ")");
    }
    if (batcher && batcher->live(seq)) {
        throw std::invalid_argument("slot " + std::to_string(seq) + " is generating; try again when it is idle");
    }
}
}  // namespace

std::string Session::cached_state(const std::vector<int32_t>& tokens) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    if (tokens.empty()) throw std::invalid_argument("the prompt is empty");
    int best = -1;
    for (int s = 0; s < e.n_parallel(); ++s) {
        if (batcher_ && batcher_->live(s)) continue;
        const auto& held = e.seq_tokens(s);
        if (held.size() < tokens.size() || !std::equal(tokens.begin(), tokens.end(), held.begin())) continue;
        if (best < 0 || held.size() < e.seq_tokens(best).size()) best = s;
    }
    if (best < 0 || e.lora_scales() != e.default_lora_scales()) return {};  // saved cells are the defaults'
    const int n = static_cast<int>(tokens.size());
    if (static_cast<int>(e.seq_tokens(best).size()) == n) return e.seq_state(best);
    // Longer (an answer after the prompt): a copy cut to the prompt, in a spare sequence.
    const int spare = batcher_ ? batcher_->spare(best) : -1;
    if (spare < 0) {
        if (!e.seq_truncate(best, n)) return {};
        return e.seq_state(best);
    }
    e.seq_clear(spare);
    e.seq_fork(best, spare, n);
    std::string out = e.seq_state(spare);
    e.seq_clear(spare);
    return out;
}

Session::SeqState Session::seq_state(int seq) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    check_idle_seq(e, batcher_.get(), seq);
    if (e.seq_tokens(seq).empty()) throw std::invalid_argument("slot " + std::to_string(seq) + " holds nothing");
    return {e.seq_tokens(seq), e.seq_state(seq), e.lora_scales()};
}

int Session::restore_state(const std::vector<int32_t>& tokens, const std::string& data, int seq,
                           const std::vector<float>& lora_scales) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    e.check_tokens(tokens);
    if (tokens.empty()) throw std::invalid_argument("the state holds no tokens");
    if (static_cast<int>(tokens.size()) >= shape_.seq_capacity) {
        throw std::invalid_argument("the state's " + std::to_string(tokens.size()) +
                                    " tokens do not fit a sequence of this context (" +
                                    std::to_string(shape_.seq_capacity) + " cells)");
    }
    if (static_cast<int>(lora_scales.size()) != e.n_adapters()) {
        throw std::invalid_argument("the state was saved with " + std::to_string(lora_scales.size()) +
                                    " LoRA adapters; this model has " + std::to_string(e.n_adapters()));
    }
    Batcher& b = batcher();
    if (seq < 0) {
        seq = b.spare(-1);
        if (seq < 0) throw QueueFullError("every sequence is generating; restore the state when one is idle");
    }
    check_idle_seq(e, &b, seq);
    // The cache holds cells of the context's current adapter scales only.
    if (lora_scales != e.lora_scales()) {
        if (b.busy()) {
            throw QueueFullError("the state's cells were computed under other LoRA scales than the running "
                                 "requests'; restore it when they finish");
        }
        e.set_lora_scales(lora_scales);
    }
    for (;;) {
        try {
            e.set_seq_state(seq, data, tokens);
            break;
        } catch (const std::invalid_argument&) {
            // No room in the shared cache: drop cached sequences, least recently used first.
            const int victim = e.deterministic() ? -1 : b.evictable(seq);
            if (victim < 0) throw;
            e.seq_clear(victim);
        }
    }
    b.touch(seq);
    return seq;
}

void Session::erase_seq(int seq) {
    std::lock_guard<FairMutex> lock(mutex_);
    Engine& e = engine();
    check_idle_seq(e, batcher_.get(), seq);
    e.seq_clear(seq);
}

std::vector<int32_t> Session::tokenize(const std::string& text, bool add_special, bool parse_special) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().tokenize(text, add_special, parse_special);
}

std::string Session::detokenize(const std::vector<int32_t>& tokens) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().detokenize(tokens);
}

std::string Session::token_piece(int32_t token) {
    std::shared_lock<std::shared_mutex> life(life_);
    Engine& e = engine();
    e.check_tokens({token});
    return e.token_piece(token, true);
}

const ModelFileInfo& Session::file_info() {
    std::lock_guard<FairMutex> lock(mutex_);
    return engine().file_info();
}

std::string Session::adapter_meta(int index, const std::string& key) {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().adapter_meta(index, key);
}

int32_t Session::eos_token() { std::shared_lock<std::shared_mutex> life(life_); return engine().eos_token(); }

int Session::n_adapters() { std::shared_lock<std::shared_mutex> life(life_); return engine().n_adapters(); }

int Session::n_vocab() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_vocab; }
int Session::n_embd() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_embd; }
int Session::n_ctx() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_ctx; }
int Session::seq_capacity() {
    std::shared_lock<std::shared_mutex> life(life_);
    engine();
    return shape_.seq_capacity;
}
bool Session::deterministic() {
    std::shared_lock<std::shared_mutex> life(life_);
    engine();
    return shape_.deterministic;
}
int Session::n_threads() { std::lock_guard<FairMutex> lock(mutex_); return engine().n_threads(); }
int Session::n_parallel() { std::shared_lock<std::shared_mutex> life(life_); engine(); return shape_.n_parallel; }
int64_t Session::decoded_tokens() { std::lock_guard<FairMutex> lock(mutex_); return engine().decoded_tokens(); }
int64_t Session::logit_rows() { std::lock_guard<FairMutex> lock(mutex_); return engine().logit_rows(); }
bool Session::has_chat_template() {
    std::shared_lock<std::shared_mutex> life(life_);
    return engine().has_chat_template();
}
std::shared_ptr<const ChatTemplates> Session::chat_templates(const std::string& source, bool jinja) {
    std::shared_lock<std::shared_mutex> life(life_);
    return std::make_shared<const ChatTemplates>(engine().model(), source, jinja);
}

ChatPrompt Session::apply_chat(const ChatTemplates& templates, const ChatRequest& request) {
    std::shared_lock<std::shared_mutex> life(life_);
    return templates.apply(engine().vocab(), request);
}

bool Session::is_eog(int32_t token) { std::shared_lock<std::shared_mutex> life(life_); return engine().is_eog(token); }
}  // namespace slot
