"""GGUF models, the files llama.cpp and Ollama users have: a language model (`-m model.gguf`)
and its vision projector (`--mmproj mmproj.gguf`), run through the same loader, families
and backends as Hugging Face checkpoints.

    reader.py     one GGUF file: header, metadata, tensor directory; tensors read and
                  dequantized (gguf.quants) one at a time
    text.py       the language model: `{arch}.*` -> text_config, blk.N.* -> transformers' names,
                  llama.cpp's rewrites undone (Llama q/k RoPE permutation, Gemma's norm + 1)
    mmproj.py     the vision file: `clip.*` -> LLaVA's vision config, v.* / mm.* -> llava-hf's names
    tokenizer.py  tokenizer.ggml.* -> a `tokenizers` tokenizer, as transformers builds it
    source.py     the pair presented as a Hugging Face folder whose weights stream from the files
"""
