# Checks that a documentation page quotes a source file's excerpt verbatim: the text of
# SOURCE from the first line containing BEGIN up to (not including) the first line after it
# containing END must occur in DOC. Run with cmake -DDOC=... -DSOURCE=... -DBEGIN=... -DEND=... -P
file(READ "${SOURCE}" src)
file(READ "${DOC}" doc)
string(FIND "${src}" "${BEGIN}" b)
if(b EQUAL -1)
  message(FATAL_ERROR "${SOURCE}: no line with '${BEGIN}'")
endif()
string(SUBSTRING "${src}" ${b} -1 rest)
string(FIND "${rest}" "${END}" e)
if(e EQUAL -1)
  message(FATAL_ERROR "${SOURCE}: no line with '${END}' after '${BEGIN}'")
endif()
string(SUBSTRING "${rest}" 0 ${e} excerpt)
string(STRIP "${excerpt}" excerpt)
string(FIND "${doc}" "${excerpt}" found)
if(found EQUAL -1)
  message(FATAL_ERROR "${DOC} does not quote ${SOURCE} from '${BEGIN}' to '${END}' verbatim: "
                      "copy the function from the source file into the page again")
endif()
message(STATUS "${DOC} quotes ${SOURCE} verbatim (${e} characters)")
