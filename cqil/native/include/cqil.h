/* cqil.h: the C API of libcqil, the native runtime for cqil engine directories.
 *
 * libcqil opens an engine compiled with `cqil-compile ... --formats onnx,aoti` and generates from
 * it with the semantics and tokens of the Python runtime (`cqil.load(dir).generate(...)`): every
 * rank's program (AOTInductor segment packages and the collectives between them) runs in a thread
 * of its own, collectives sum in rank order, and each rank keeps its KV cache in preallocated
 * buffers that the packages write in place.
 *
 *     cqil_engine* engine; cqil_generator* gen; int64_t token; int done = 0;
 *     const int64_t ids[] = {1, 2, 3}; const size_t len = 3;
 *     if (cqil_engine_create("engine_dir", NULL, &engine) != CQIL_OK) { puts(cqil_last_error()); return 1; }
 *     cqil_generator_create(engine, NULL, ids, &len, 1, &gen);        (NULL params: greedy)
 *     while (cqil_generator_done(gen, &done) == CQIL_OK && !done)
 *         cqil_generator_next_tokens(gen, &token, 1);
 *     cqil_generator_destroy(gen); cqil_engine_destroy(engine);
 *
 * Conventions
 * - Handles are opaque, made by cqil_X_create and freed by cqil_X_destroy (NULL is fine there).
 * - Every other call returns a cqil_status. On failure, cqil_last_error() gives one line naming the
 *   problem (as the Python CLI prints it); outputs are left untouched. Bad input (a NULL handle,
 *   ids outside the vocabulary, a prompt longer than max_seq_len, a damaged engine) is an error
 *   status, never a crash or an abort.
 * - Token ids are int64; a batch of ragged prompts is given as all rows' ids back to back plus one
 *   length per row, and is left-padded inside (as the Python runtime does).
 *
 * Thread safety
 * - cqil_last_error() is per thread: it describes the calling thread's last failed call.
 * - An engine may be shared by threads: any number of generators may live on it, each owned by
 *   one thread at a time. Their steps are serialised by the engine (one forward pass at a time), so
 *   concurrent generators interleave step by step and each gets the tokens it gets alone.
 * - One generator (and one params / options handle) must not be used by two threads at once.
 * - cqil_engine_destroy may be called while generators live: the engine is freed with the last of
 *   them. It must not race with calls on the same engine handle.
 */
#ifndef CQIL_H
#define CQIL_H

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#define CQIL_API __declspec(dllexport)
#elif defined(__GNUC__)
#define CQIL_API __attribute__((visibility("default")))
#else
#define CQIL_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum cqil_status {
  CQIL_OK = 0,
  CQIL_ERROR_INVALID_ARGUMENT = 1, /* the caller's input: a NULL handle, bad ids, too long a prompt */
  CQIL_ERROR_ENGINE = 2,           /* the engine directory: missing, damaged, built for another torch/CPU */
  CQIL_ERROR_RUNTIME = 3,          /* a rank failed while running (the message names it) */
  CQIL_ERROR_STATE = 4,            /* a call the generator's state does not allow (done, no logits) */
  CQIL_ERROR_INTERNAL = 5          /* a bug or out of memory */
} cqil_status;

typedef struct cqil_engine_options cqil_engine_options;
typedef struct cqil_engine cqil_engine;
typedef struct cqil_params cqil_params;
typedef struct cqil_generator cqil_generator;

/* The calling thread's last error message, one line ("" when none); valid until its next failing call. */
CQIL_API const char* cqil_last_error(void);
/* "0.1.0 (torch 2.13.0)": this library's version and the torch it was built against. */
CQIL_API const char* cqil_version(void);

/* -- engine options ------------------------------------------------------------------------- */

CQIL_API cqil_status cqil_engine_options_create(cqil_engine_options** out);
CQIL_API void cqil_engine_options_destroy(cqil_engine_options* options);
/* Intra-op threads in all (default 0: every core), split between the ranks as the Python engine
 * splits them (rank 0's outer-layer segments, which run while the others wait, get them all). */
CQIL_API cqil_status cqil_engine_options_set_threads(cqil_engine_options* options, int threads);
/* Check every file's size and sha256 against the manifest when opening (default 1). */
CQIL_API cqil_status cqil_engine_options_set_verify(cqil_engine_options* options, int verify);
/* "cpu", "cuda" (rank r on GPU r mod count), or one per rank "cuda:0,cuda:1"; default NULL: the
 * device the packages were compiled for. */
CQIL_API cqil_status cqil_engine_options_set_devices(cqil_engine_options* options, const char* devices);
/* Seconds a collective waits for a rank before naming it as hung (default 600). */
CQIL_API cqil_status cqil_engine_options_set_timeout(cqil_engine_options* options, double seconds);

/* -- engine --------------------------------------------------------------------------------- */

/* Open an engine directory (options NULL: defaults): reads and checks manifest.json and the files,
 * loads every rank's packages and starts the rank threads. */
CQIL_API cqil_status cqil_engine_create(const char* engine_dir, const cqil_engine_options* options,
                                        cqil_engine** out);
CQIL_API void cqil_engine_destroy(cqil_engine* engine);
CQIL_API cqil_status cqil_engine_vocab_size(const cqil_engine* engine, int64_t* out);
CQIL_API cqil_status cqil_engine_max_seq_len(const cqil_engine* engine, int64_t* out);
CQIL_API cqil_status cqil_engine_max_batch(const cqil_engine* engine, int64_t* out);
CQIL_API cqil_status cqil_engine_num_ranks(const cqil_engine* engine, int64_t* out);
/* The end-of-sequence ids the engine knows (tokenizer, generation_config.json, model config):
 * up to `capacity` of them into `out`, their number into `count`. */
CQIL_API cqil_status cqil_engine_eos_ids(const cqil_engine* engine, int64_t* out, size_t capacity, size_t* count);

/* -- generation parameters (defaults: greedy, no eos, until max_seq_len) ---------------------- */

CQIL_API cqil_status cqil_params_create(cqil_params** out);
CQIL_API void cqil_params_destroy(cqil_params* params);
/* Tokens each row may generate per turn (>= 1; 0: until max_seq_len). */
CQIL_API cqil_status cqil_params_set_max_new_tokens(cqil_params* params, int64_t max_new_tokens);
/* temperature 0 (below 1e-5) is greedy, the default; top_k 0: off; top_p in (0, 1], 1: off. */
CQIL_API cqil_status cqil_params_set_sampling(cqil_params* params, double temperature, int64_t top_k, double top_p);
/* Row b draws from a generator seeded with seed + b (default: fresh entropy). */
CQIL_API cqil_status cqil_params_set_seed(cqil_params* params, uint64_t seed);
/* A row that emits one of these ids finishes; later steps give it the pad id (default min(eos), or 0). */
CQIL_API cqil_status cqil_params_set_eos(cqil_params* params, const int64_t* ids, size_t count);
CQIL_API cqil_status cqil_params_set_pad(cqil_params* params, int64_t pad_id);

/* -- generator: the decode state of one batch ----------------------------------------------- */

/* A generator over `batch` prompts (ids back to back, lengths[b] each), prefilled (params NULL: defaults). */
CQIL_API cqil_status cqil_generator_create(cqil_engine* engine, const cqil_params* params, const int64_t* ids,
                                           const size_t* lengths, size_t batch, cqil_generator** out);
CQIL_API void cqil_generator_destroy(cqil_generator* generator);
/* Choose the next token of every row into tokens[0..batch) (capacity >= batch); finished rows get the
 * pad id. The chosen tokens are fed to the model by the next call that needs them. */
CQIL_API cqil_status cqil_generator_next_tokens(cqil_generator* generator, int64_t* tokens, size_t capacity);
/* Feed more tokens to every row (a new turn: every row runs again and counts max_new_tokens anew). */
CQIL_API cqil_status cqil_generator_append_tokens(cqil_generator* generator, const int64_t* ids,
                                                  const size_t* lengths, size_t batch);
/* Forget the last n positions (a chosen, not yet fed token counts as one); append before choosing again. */
CQIL_API cqil_status cqil_generator_rewind(cqil_generator* generator, size_t n);
/* 1 when every row has finished or the sequence reached max_seq_len. */
CQIL_API cqil_status cqil_generator_done(const cqil_generator* generator, int* done);
CQIL_API cqil_status cqil_generator_batch(const cqil_generator* generator, size_t* batch);
/* Logits after the last fed position, float32 [batch, vocab] (capacity >= batch * vocab). */
CQIL_API cqil_status cqil_generator_logits(const cqil_generator* generator, float* out, size_t capacity);
/* Row `row`'s tokens so far (prompt, appended, generated; no padding): up to `capacity` into `out`,
 * their number into `count` (call with capacity 0 to learn it). */
CQIL_API cqil_status cqil_generator_tokens(const cqil_generator* generator, size_t row, int64_t* out,
                                           size_t capacity, size_t* count);
/* Why row `row` finished: 0 running, 1 an eos id, 2 its max_new_tokens or max_seq_len. */
CQIL_API cqil_status cqil_generator_finish_reason(const cqil_generator* generator, size_t row, int* reason);

#ifdef __cplusplus
}
#endif
#endif /* CQIL_H */
