"""LangChain integration of lookahead (langchain-core only).

- :class:`LookaheadLLM` and :class:`ChatLookahead`: lossless lookahead decoding as a LangChain LLM / chat model.
- :class:`FAISSVectorStore` and :class:`MiniLMEmbeddings`: offline retrieval (FAISS, all-MiniLM-L6-v2).
- :class:`LookaheadRetriever`: retrieval that seeds the request-local trie of the model it feeds.

Importing this package loads no model: every class loads what it needs on first use.
"""

from .callbacks import LookaheadStatsHandler
from .chat_models import ChatLookahead
from .embeddings import MiniLMEmbeddings
from .llms import LookaheadLLM
from .retrievers import LookaheadRetriever
from .vectorstores import FAISSVectorStore

__all__ = [
    "ChatLookahead",
    "FAISSVectorStore",
    "LookaheadLLM",
    "LookaheadRetriever",
    "LookaheadStatsHandler",
    "MiniLMEmbeddings",
]
