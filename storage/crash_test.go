package storage

const crashChildEnv = "KVD_STORAGE_CRASH_CHILD"

func crashChild() {}
