"""The viewer's words in the health professional's language (the launch token's ``locale``),
and coded values (modality, body part) from the project's terminology in its eight languages.

Labels exist in English, German and French; another language falls back to English for the
labels, while coded values still come in that language when the terminology has it.

Refusals are written in English where they are raised (the audit keeps them so) and shown to
the person refused in their language through :data:`REASONS`, keyed by the English text as
written at the ``raise`` (with its ``{name}`` fields, filled afterwards): the same catalogue
pattern as gettext, without a build step. ``tests/test_viewer_leftovers.py`` checks that every
reason the viewer raises is in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ncp.fhir.terminology import Terminology, default_terminology

LANGUAGES = ("en", "de", "fr")
DCM = "http://dicom.nema.org/resources/ontology/DCM"
BODY_PART = "https://ncp.example/fhir/CodeSystem/dicom-body-part-examined"

_LABELS: dict[str, dict[str, str]] = {
    "en": {
        "title": "Image viewer",
        "studies": "Studies",
        "series": "Series",
        "images": "images",
        "frames": "frames",
        "image": "Im",
        "frame": "Fr",
        "window": "W",
        "level": "L",
        "zoom": "Zoom",
        "presets": "Window presets",
        "preset_default": "Image default",
        "preset_lung": "CT lung",
        "preset_mediastinum": "CT mediastinum",
        "preset_bone": "CT bone",
        "preset_brain": "CT brain",
        "preset_abdomen": "CT abdomen",
        "tool_window": "Window",
        "tool_pan": "Pan",
        "tool_zoom": "Zoom",
        "tool_scroll": "Scroll",
        "reset": "Reset",
        "cine": "Cine",
        "info": "Info",
        "help": "Help",
        "lossy": "LOSSY PREVIEW",
        "lossless": "LOSSLESS",
        "loading": "Loading…",
        "no_images": "This study has no images that can be shown.",
        "session_ends": "Session ends",
        "session_over": "The viewing session has ended. Open the images again from your portal.",
        "patient": "Patient",
        "born": "born",
        "sex": "Sex",
        "study": "Study",
        "accession": "Accession",
        "institution": "Institution",
        "instance_info": "Image information",
        "series_info": "Series information",
        "thickness": "Thickness",
        "location": "Location",
        "spacing": "Pixel spacing",
        "size": "Size",
        "syntax": "Transfer syntax",
        "photometric": "Photometric",
        "modality": "Modality",
        "body_part": "Body part",
        "description": "Description",
        "number": "Number",
        "date": "Date",
        "shortcuts": "Keyboard shortcuts",
        "key_scroll": "Previous / next image",
        "key_series": "Previous / next series",
        "key_first_last": "First / last image",
        "key_cine": "Play / stop cine",
        "key_presets": "Window presets",
        "key_default": "Image default window",
        "key_zoom": "Zoom in / out",
        "key_reset": "Reset view",
        "key_tools": "Tools: window, pan, zoom, scroll",
        "key_info": "Image information",
        "key_help": "This help",
        "close": "Close",
        "placeholder": "This image cannot be displayed",
        "refused_title": "The images cannot be opened",
        "refused_hint": "Ask for the images again in your portal; a viewer link works once "
        "and for one minute.",
        "error_code": "Reason",
        "help_desk": "For the help desk",
        "end_session": "End session",
        "end_session_hint": "End the viewing session now",
        "session_closed": "The viewing session is ended. You can close this window.",
        "cine_rate": "Cine speed",
        "cine_auto": "series speed",
        "fps": "fps",
        "key_cine_rate": "Slower / faster cine",
    },
    "de": {
        "title": "Bildbetrachter",
        "studies": "Studien",
        "series": "Serien",
        "images": "Bilder",
        "frames": "Frames",
        "image": "Bild",
        "frame": "Fr",
        "window": "W",
        "level": "L",
        "zoom": "Zoom",
        "presets": "Fenstervorgaben",
        "preset_default": "Bildvorgabe",
        "preset_lung": "CT Lunge",
        "preset_mediastinum": "CT Mediastinum",
        "preset_bone": "CT Knochen",
        "preset_brain": "CT Gehirn",
        "preset_abdomen": "CT Abdomen",
        "tool_window": "Fenster",
        "tool_pan": "Verschieben",
        "tool_zoom": "Zoom",
        "tool_scroll": "Blättern",
        "reset": "Zurücksetzen",
        "cine": "Cine",
        "info": "Info",
        "help": "Hilfe",
        "lossy": "VERLUSTBEHAFTETE VORSCHAU",
        "lossless": "VERLUSTFREI",
        "loading": "Wird geladen…",
        "no_images": "Diese Studie enthält keine darstellbaren Bilder.",
        "session_ends": "Sitzung endet",
        "session_over": "Die Sitzung ist beendet. Öffnen Sie die Bilder erneut über Ihr Portal.",
        "patient": "Patient",
        "born": "geb.",
        "sex": "Geschlecht",
        "study": "Studie",
        "accession": "Auftragsnummer",
        "institution": "Einrichtung",
        "instance_info": "Bildinformationen",
        "series_info": "Serieninformationen",
        "thickness": "Schichtdicke",
        "location": "Position",
        "spacing": "Pixelabstand",
        "size": "Größe",
        "syntax": "Transfersyntax",
        "photometric": "Photometrie",
        "modality": "Modalität",
        "body_part": "Körperregion",
        "description": "Beschreibung",
        "number": "Nummer",
        "date": "Datum",
        "shortcuts": "Tastenkürzel",
        "key_scroll": "Vorheriges / nächstes Bild",
        "key_series": "Vorherige / nächste Serie",
        "key_first_last": "Erstes / letztes Bild",
        "key_cine": "Cine starten / anhalten",
        "key_presets": "Fenstervorgaben",
        "key_default": "Fenster des Bildes",
        "key_zoom": "Vergrößern / verkleinern",
        "key_reset": "Ansicht zurücksetzen",
        "key_tools": "Werkzeuge: Fenster, Verschieben, Zoom, Blättern",
        "key_info": "Bildinformationen",
        "key_help": "Diese Hilfe",
        "close": "Schließen",
        "placeholder": "Dieses Bild kann nicht angezeigt werden",
        "refused_title": "Die Bilder können nicht geöffnet werden",
        "refused_hint": "Fordern Sie die Bilder in Ihrem Portal erneut an; ein Betrachter-Link "
        "gilt einmal und eine Minute lang.",
        "error_code": "Grund",
        "help_desk": "Für den Support",
        "end_session": "Sitzung beenden",
        "end_session_hint": "Die Betrachtungssitzung jetzt beenden",
        "session_closed": "Die Sitzung ist beendet. Sie können dieses Fenster schließen.",
        "cine_rate": "Cine-Geschwindigkeit",
        "cine_auto": "Serientempo",
        "fps": "B/s",
        "key_cine_rate": "Cine langsamer / schneller",
    },
    "fr": {
        "title": "Visionneuse d'images",
        "studies": "Examens",
        "series": "Séries",
        "images": "images",
        "frames": "trames",
        "image": "Im",
        "frame": "Tr",
        "window": "L",
        "level": "C",
        "zoom": "Zoom",
        "presets": "Fenêtres prédéfinies",
        "preset_default": "Fenêtre de l'image",
        "preset_lung": "TDM poumon",
        "preset_mediastinum": "TDM médiastin",
        "preset_bone": "TDM os",
        "preset_brain": "TDM cerveau",
        "preset_abdomen": "TDM abdomen",
        "tool_window": "Fenêtrage",
        "tool_pan": "Déplacer",
        "tool_zoom": "Zoom",
        "tool_scroll": "Défiler",
        "reset": "Réinitialiser",
        "cine": "Ciné",
        "info": "Infos",
        "help": "Aide",
        "lossy": "APERÇU AVEC PERTE",
        "lossless": "SANS PERTE",
        "loading": "Chargement…",
        "no_images": "Cet examen ne contient aucune image affichable.",
        "session_ends": "Fin de session",
        "session_over": "La session est terminée. Rouvrez les images depuis votre portail.",
        "patient": "Patient",
        "born": "né(e) le",
        "sex": "Sexe",
        "study": "Examen",
        "accession": "N° d'examen",
        "institution": "Établissement",
        "instance_info": "Informations sur l'image",
        "series_info": "Informations sur la série",
        "thickness": "Épaisseur",
        "location": "Position",
        "spacing": "Espacement des pixels",
        "size": "Taille",
        "syntax": "Syntaxe de transfert",
        "photometric": "Photométrie",
        "modality": "Modalité",
        "body_part": "Région anatomique",
        "description": "Description",
        "number": "Numéro",
        "date": "Date",
        "shortcuts": "Raccourcis clavier",
        "key_scroll": "Image précédente / suivante",
        "key_series": "Série précédente / suivante",
        "key_first_last": "Première / dernière image",
        "key_cine": "Lancer / arrêter le ciné",
        "key_presets": "Fenêtres prédéfinies",
        "key_default": "Fenêtre de l'image",
        "key_zoom": "Agrandir / réduire",
        "key_reset": "Réinitialiser la vue",
        "key_tools": "Outils : fenêtrage, déplacer, zoom, défiler",
        "key_info": "Informations sur l'image",
        "key_help": "Cette aide",
        "close": "Fermer",
        "placeholder": "Cette image ne peut pas être affichée",
        "refused_title": "Les images ne peuvent pas être ouvertes",
        "refused_hint": "Demandez à nouveau les images dans votre portail ; un lien de "
        "visualisation ne sert qu'une fois, pendant une minute.",
        "error_code": "Motif",
        "help_desk": "Pour l'assistance",
        "end_session": "Terminer la session",
        "end_session_hint": "Terminer maintenant la session de visualisation",
        "session_closed": "La session est terminée. Vous pouvez fermer cette fenêtre.",
        "cine_rate": "Vitesse du ciné",
        "cine_auto": "cadence série",
        "fps": "im/s",
        "key_cine_rate": "Ciné plus lent / plus rapide",
    },
}

REASONS: dict[str, dict[str, str]] = {
    # -- the viewer's routes (ncp.viewer.app) --
    "percent-encoded characters in the path": {
        "de": "Der Pfad enthält prozentkodierte Zeichen",
        "fr": "le chemin contient des caractères encodés en pourcentage",
    },
    "a backslash or an empty segment in the path": {
        "de": "Der Pfad enthält einen umgekehrten Schrägstrich oder ein leeres Segment",
        "fr": "le chemin contient une barre oblique inverse ou un segment vide",
    },
    "a dot segment in the path": {
        "de": "Der Pfad enthält ein Punktsegment",
        "fr": "le chemin contient un segment « . » ou « .. »",
    },
    "the image archive is not available now": {
        "de": "Das Bildarchiv ist derzeit nicht erreichbar",
        "fr": "l'archive d'images n'est pas disponible pour le moment",
    },
    "the audit record could not be written": {
        "de": "Der Protokolleintrag konnte nicht geschrieben werden",
        "fr": "l'enregistrement d'audit n'a pas pu être écrit",
    },
    "a path segment that should be a UID is not one": {
        "de": "Ein Pfadsegment, das eine UID sein sollte, ist keine",
        "fr": "un segment du chemin qui devrait être un UID n'en est pas un",
    },
    "this session does not cover the study asked for": {
        "de": "Diese Sitzung umfasst die angeforderte Studie nicht",
        "fr": "cette session ne couvre pas l'examen demandé",
    },
    "the archive holds no images of this study": {
        "de": "Das Archiv enthält keine Bilder dieser Studie",
        "fr": "l'archive ne contient aucune image de cet examen",
    },
    "{count} images asked for at once; at most {limit}: ask per instance or per frame": {
        "de": "{count} Bilder auf einmal angefordert; höchstens {limit}: bitte pro Bild oder "
        "Frame anfordern",
        "fr": "{count} images demandées à la fois ; {limit} au plus : demandez-les par image "
        "ou par trame",
    },
    "no image to make a thumbnail of": {
        "de": "Kein Bild für eine Miniaturansicht vorhanden",
        "fr": "aucune image pour en faire une vignette",
    },
    "no such image in the series": {
        "de": "Dieses Bild gibt es in der Serie nicht",
        "fr": "cette image n'existe pas dans la série",
    },
    "frame numbers must be positive whole numbers": {
        "de": "Frame-Nummern müssen positive ganze Zahlen sein",
        "fr": "les numéros de trame doivent être des entiers positifs",
    },
    "the image has {frames} frame(s)": {
        "de": "Das Bild hat {frames} Frame(s)",
        "fr": "l'image a {frames} trame(s)",
    },
    "no such series in the study": {
        "de": "Diese Serie gibt es in der Studie nicht",
        "fr": "cette série n'existe pas dans l'examen",
    },
    "query parameter {name} is not supported here": {
        "de": "Der Abfrageparameter {name} wird hier nicht unterstützt",
        "fr": "le paramètre de requête {name} n'est pas pris en charge ici",
    },
    "query parameter {name} is given twice": {
        "de": "Der Abfrageparameter {name} ist doppelt angegeben",
        "fr": "le paramètre de requête {name} est donné deux fois",
    },
    "no such file": {"de": "Diese Datei gibt es nicht", "fr": "ce fichier n'existe pas"},
    "no such viewer resource": {
        "de": "Diese Ressource gibt es im Betrachter nicht",
        "fr": "cette ressource n'existe pas dans la visionneuse",
    },
    "ending a session must come from the viewer's own page": {
        "de": "Eine Sitzung kann nur von der Seite des Betrachters aus beendet werden",
        "fr": "seule la page de la visionneuse peut terminer une session",
    },
    # -- rendered-resource parameters (ncp.viewer.render_output) --
    "window must be center,width[,function] with numbers": {
        "de": "window muss Zentrum,Breite[,Funktion] mit Zahlen sein",
        "fr": "window doit être centre,largeur[,fonction] avec des nombres",
    },
    "the window function must be linear, linear-exact or sigmoid": {
        "de": "Die Fensterfunktion muss linear, linear-exact oder sigmoid sein",
        "fr": "la fonction de fenêtrage doit être linear, linear-exact ou sigmoid",
    },
    "window centre and width must be finite numbers": {
        "de": "Fensterzentrum und -breite müssen endliche Zahlen sein",
        "fr": "le centre et la largeur de la fenêtre doivent être des nombres finis",
    },
    "a linear window's width must be at least 1": {
        "de": "Die Breite eines linearen Fensters muss mindestens 1 sein",
        "fr": "la largeur d'une fenêtre linéaire doit être d'au moins 1",
    },
    "the window's width must be positive": {
        "de": "Die Fensterbreite muss positiv sein",
        "fr": "la largeur de la fenêtre doit être positive",
    },
    "viewport must be vw,vh or vw,vh,sx,sy,sw,sh in whole pixels": {
        "de": "viewport muss vw,vh oder vw,vh,sx,sy,sw,sh in ganzen Pixeln sein",
        "fr": "viewport doit être vw,vh ou vw,vh,sx,sy,sw,sh en pixels entiers",
    },
    "viewport width and height must be 1 to {largest}": {
        "de": "Breite und Höhe von viewport müssen zwischen 1 und {largest} liegen",
        "fr": "la largeur et la hauteur de viewport doivent aller de 1 à {largest}",
    },
    "the viewport's source region must start inside the image": {
        "de": "Der Quellbereich von viewport muss im Bild beginnen",
        "fr": "la région source de viewport doit commencer dans l'image",
    },
    "the viewport's source region starts outside the image": {
        "de": "Der Quellbereich von viewport beginnt außerhalb des Bildes",
        "fr": "la région source de viewport commence hors de l'image",
    },
    "the viewport's source region holds no pixels": {
        "de": "Der Quellbereich von viewport enthält keine Pixel",
        "fr": "la région source de viewport ne contient aucun pixel",
    },
    "quality must be a whole number from 1 to 100": {
        "de": "quality muss eine ganze Zahl von 1 bis 100 sein",
        "fr": "quality doit être un entier de 1 à 100",
    },
    "rendered images are offered as {types} only, never as DICOM": {
        "de": "Gerenderte Bilder gibt es nur als {types}, niemals als DICOM",
        "fr": "les images rendues sont proposées en {types} uniquement, jamais en DICOM",
    },
    # -- the launch (ncp.viewer.launch) --
    "the link has no launch code": {
        "de": "Der Link enthält keinen Startcode",
        "fr": "le lien ne contient pas de code de lancement",
    },
    "the viewer is busy: try again in a minute": {
        "de": "Der Betrachter ist ausgelastet: Versuchen Sie es in einer Minute erneut",
        "fr": "la visionneuse est occupée : réessayez dans une minute",
    },
    "requestType must be STUDY or PATIENT": {
        "de": "requestType muss STUDY oder PATIENT sein",
        "fr": "requestType doit être STUDY ou PATIENT",
    },
    "the link asks for a study the launch code does not cover": {
        "de": "Der Link fordert eine Studie an, die der Startcode nicht umfasst",
        "fr": "le lien demande un examen que le code de lancement ne couvre pas",
    },
    "the link names another patient than the launch code": {
        "de": "Der Link nennt einen anderen Patienten als der Startcode",
        "fr": "le lien désigne un autre patient que le code de lancement",
    },
    "no study of this launch has the accession number asked for": {
        "de": "Keine Studie dieses Aufrufs hat die angeforderte Auftragsnummer",
        "fr": "aucun examen de ce lancement n'a le numéro d'examen demandé",
    },
    "the link gives {name} twice": {
        "de": "Der Link enthält {name} doppelt",
        "fr": "le lien donne {name} deux fois",
    },
    "the link has an unknown parameter {name}": {
        "de": "Der Link enthält einen unbekannten Parameter {name}",
        "fr": "le lien contient un paramètre inconnu {name}",
    },
    "studyUID must be a comma list of Study Instance UIDs": {
        "de": "studyUID muss eine durch Kommas getrennte Liste von Study Instance UIDs sein",
        "fr": "studyUID doit être une liste de Study Instance UID séparés par des virgules",
    },
    "this viewer link has been used already (each link opens the viewer once)": {
        "de": "Dieser Betrachter-Link wurde bereits verwendet (jeder Link öffnet den Betrachter "
        "einmal)",
        "fr": "ce lien de visualisation a déjà été utilisé (chaque lien n'ouvre la visionneuse "
        "qu'une fois)",
    },
    "this viewer link has expired (a link is valid for one minute)": {
        "de": "Dieser Betrachter-Link ist abgelaufen (ein Link gilt eine Minute lang)",
        "fr": "ce lien de visualisation a expiré (un lien est valable une minute)",
    },
    "this link is for another viewer": {
        "de": "Dieser Link gilt für einen anderen Betrachter",
        "fr": "ce lien est destiné à une autre visionneuse",
    },
    "this is not a viewer launch code": {
        "de": "Dies ist kein Startcode für den Betrachter",
        "fr": "ceci n'est pas un code de lancement de la visionneuse",
    },
    "the launch code is not valid ({kind})": {
        "de": "Der Startcode ist ungültig ({kind})",
        "fr": "le code de lancement n'est pas valide ({kind})",
    },
    # -- sessions (ncp.viewer.sessions) --
    "the assertions this launch was issued under have expired": {
        "de": "Die Bestätigungen, unter denen dieser Aufruf ausgestellt wurde, sind abgelaufen",
        "fr": "les attestations sous lesquelles ce lancement a été émis ont expiré",
    },
    "no viewer session: open the images from your portal": {
        "de": "Keine Betrachtersitzung: Öffnen Sie die Bilder über Ihr Portal",
        "fr": "aucune session de visualisation : ouvrez les images depuis votre portail",
    },
    "no such viewer session: open the images from your portal": {
        "de": "Diese Betrachtersitzung gibt es nicht: Öffnen Sie die Bilder über Ihr Portal",
        "fr": "cette session de visualisation n'existe pas : ouvrez les images depuis votre "
        "portail",
    },
    "the viewer session has ended: open the images again from your portal": {
        "de": "Die Betrachtersitzung ist beendet: Öffnen Sie die Bilder erneut über Ihr Portal",
        "fr": "la session de visualisation est terminée : rouvrez les images depuis votre portail",
    },
}
"""Refusal reasons by their English text (with ``{name}`` fields) -> German and French."""


PRESETS = (
    ("preset_lung", -600.0, 1500.0),
    ("preset_mediastinum", 50.0, 350.0),
    ("preset_bone", 400.0, 1800.0),
    ("preset_brain", 40.0, 80.0),
    ("preset_abdomen", 50.0, 400.0),
)
"""CT window presets (level, width in HU), in the order of the keys 1 to 5."""


def language_of(locale: str | None) -> str:
    """The labels' language for a BCP 47 tag: its primary subtag when held, else English."""
    primary = (locale or "").strip().replace("_", "-").split("-", 1)[0].lower()
    return primary if primary in _LABELS else "en"


def labels(locale: str | None) -> dict[str, str]:
    return dict(_LABELS[language_of(locale)])


def reason_in(
    template: str, language: str | None, params: Mapping[str, object] | None = None
) -> str:
    """A refusal reason (its English text as raised, :data:`REASONS`) in ``language``, with
    its fields filled; the English text when the catalogue lacks the reason or language."""
    said = REASONS.get(template, {}).get(language_of(language), template)
    if not params:
        return said
    try:
        return said.format(**params)
    except (KeyError, IndexError, ValueError):
        return template.format(**params)


def from_accept_language(header: str | None) -> str:
    """The best held language from an Accept-Language header (for pages shown before anyone is
    known, such as a refused launch)."""
    ranked: list[tuple[float, int, str]] = []
    for order, item in enumerate((header or "").split(",")):
        tag, _, params = item.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        language = tag.strip().split("-", 1)[0].lower()
        if language in _LABELS and q > 0:
            ranked.append((-q, order, language))
    return min(ranked)[2] if ranked else "en"


def coded_displays(
    locale: str | None, modalities: Iterable[str], body_parts: Iterable[str]
) -> dict[str, dict[str, str]]:
    """Displays of DICOM modality codes and Body Part Examined terms in the HP's language
    (``locale`` as given: a terminology language beyond the labels' three is used too)."""
    terms: Terminology = default_terminology()  # read once, cached by the module
    language = (locale or "en").strip() or "en"
    out: dict[str, dict[str, str]] = {"modality": {}, "bodyPart": {}}
    for code in sorted(set(modalities)):
        shown = terms.display(DCM, code, language)
        if shown:
            out["modality"][code] = shown
    for code in sorted(set(body_parts)):
        shown = terms.display(BODY_PART, code, language)
        if shown:
            out["bodyPart"][code] = shown
    return out
